"""Region proposals on the pixel-level grid: a CenterNet-style head, its training loss and its decoding.

The EVLF pixel connector hands the LLM a few proposals, each as a region token plus its four box numbers as ordinary
number tokens; the LLM then chooses among them and writes the boxes as text (Groma's region tokens, VILA-M3's expert
outputs). Copying numbers already in the context is easy for a small LM; inventing them from a feature grid is not
(docs/models.md has the measurements). Why our own CenterNet: neither MONAI (RetinaNet, anchor-based, 3D-first) nor
torchvision ships an anchor-free centre head that works on any encoder's feature grid; the GIoU term uses
torchvision's op.

Boxes here are fractions of the image, ``(x1, y1, x2, y2)`` in [0, 1], edge coordinates (docs/conventions.md).
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from torchvision.ops import box_iou, generalized_box_iou_loss, roi_align

CENTRE_PRIOR_LOGIT = -2.19  # CenterNet's prior: a cell is a centre with p = 0.1, so early losses stay sane
REFINE_WINDOW = 2.0  # the refiner looks at a square of twice the proposal's longer side ...
REFINE_MIN_WINDOW = 10.0  # ... and never less than this many input pixels (a 2-pixel lesion needs its surroundings)
REFINE_CROP = 16  # RoIAlign samples per window side
REFINE_MIN_IOU = 0.1  # a proposal overlapping a true box at least this much learns to become that box


@dataclass
class DetectionTarget:
    """One image's true boxes (``(N, 4)`` fractions), finding-label and site indices (``-1``: unknown)."""

    boxes: torch.Tensor
    labels: torch.Tensor
    sites: torch.Tensor

    @classmethod
    def empty(cls) -> DetectionTarget:
        return cls(torch.zeros(0, 4), torch.zeros(0, dtype=torch.long), torch.zeros(0, dtype=torch.long))


@dataclass
class Proposals:
    """The top-K decoded proposals per image, best first; every tensor has leading dims ``(B, K)``."""

    boxes: torch.Tensor  # (B, K, 4) fractions of the image
    scores: torch.Tensor  # (B, K) centre-heatmap peak
    quality: torch.Tensor  # (B, K) predicted IoU with the true box
    label_probs: torch.Tensor  # (B, K, num_labels)
    site_probs: torch.Tensor  # (B, K, num_sites)
    features: torch.Tensor  # (B, K, C) grid feature at the peak


class DetectionHead(nn.Module):
    """Per grid cell: centre logit, four log edge distances, finding-label and site logits, IoU-quality logit."""

    def __init__(self, channels: int, num_labels: int, num_sites: int) -> None:
        super().__init__()
        self.num_labels, self.num_sites = num_labels, num_sites
        self.trunk = nn.Sequential(nn.Conv2d(channels, channels, 1), nn.ReLU(inplace=True))
        self.out = nn.Conv2d(channels, 1 + 4 + num_labels + num_sites + 1, 1)
        self.out.centre_prior = True  # read by the model's weight init, which runs after this constructor
        with torch.no_grad():
            self.out.bias[0] = CENTRE_PRIOR_LOGIT

    def forward(self, grid: torch.Tensor) -> torch.Tensor:
        return self.out(self.trunk(grid))


def split_maps(maps: torch.Tensor, num_labels: int, num_sites: int) -> dict[str, torch.Tensor]:
    """The head's output channels by meaning (a function, so callers need only the class counts).

    ``log_edges``: log distances, in grid cells, from the cell's centre to the box's left, top, right and bottom
    edges (FCOS / TTFNet), so every cell inside a box can regress it, not only the one at its centre.
    """
    n_l, n_s = num_labels, num_sites
    return {
        "centre": maps[:, 0],
        "log_edges": maps[:, 1:5],
        "label": maps[:, 5 : 5 + n_l],
        "site": maps[:, 5 + n_l : 5 + n_l + n_s],
        "quality": maps[:, 5 + n_l + n_s],
    }


def _gaussian_heatmap(target: DetectionTarget, side: int) -> torch.Tensor:
    """Centre targets: a Gaussian per box, peak 1 at its centre cell, spread with its size (max over boxes)."""
    heat = np.zeros((side, side))
    ys, xs = np.mgrid[0:side, 0:side]
    for x1, y1, x2, y2 in target.boxes.numpy() * side:
        ix, iy = int(np.clip((x1 + x2) / 2, 0, side - 1)), int(np.clip((y1 + y2) / 2, 0, side - 1))
        sigma = max(0.6, 0.15 * float(np.sqrt(max((x2 - x1) * (y2 - y1), 1e-6))))
        heat = np.maximum(heat, np.exp(-((xs - ix) ** 2 + (ys - iy) ** 2) / (2 * sigma**2)))
        heat[iy, ix] = 1.0
    return torch.from_numpy(heat).float()


def _regression_targets(targets: list[DetectionTarget], side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Dense box-regression targets: per cell a weight and the box it regresses (``(B, H, W)``, ``(B, 4, H, W)``).

    Every cell whose centre lies inside a box regresses it, weighted by a Gaussian of the box's own shape
    (sigma = side / 6 per axis, TTFNet) and normalised so that each box counts once: large boxes train from many
    cells, small ones from the few they cover, and the centre cell always counts. Where boxes overlap, a cell
    regresses the one it weighs most. Dense maps, because indexing a few thousand cells costs more on the CPU than
    the detector's convolutions.
    """
    weight = np.zeros((len(targets), side, side))
    truth = np.zeros((len(targets), 4, side, side))
    centres = np.arange(side) + 0.5
    for n, target in enumerate(targets):
        for box in target.boxes.numpy().astype(np.float64):
            x1, y1, x2, y2 = box * side
            cx, cy = (x1 + x2) / 2, (y1 + y2) / 2
            sx, sy = max(0.5, (x2 - x1) / 6), max(0.5, (y2 - y1) / 6)
            gx = np.where((centres > x1) & (centres < x2), np.exp(-((centres - cx) ** 2) / (2 * sx**2)), 0.0)
            gy = np.where((centres > y1) & (centres < y2), np.exp(-((centres - cy) ** 2) / (2 * sy**2)), 0.0)
            w = gy[:, None] * gx[None, :]
            w[int(np.clip(cy, 0, side - 1)), int(np.clip(cx, 0, side - 1))] = 1.0
            w /= w.sum()
            better = w > weight[n]
            weight[n][better] = w[better]
            truth[n][:, better] = box[:, None]
    return torch.from_numpy(weight).float(), torch.from_numpy(truth).float()


def detection_loss(
    maps: torch.Tensor,
    targets: list[DetectionTarget],
    num_labels: int,
    num_sites: int,
    site_weight_mask: torch.Tensor | None = None,
) -> dict[str, torch.Tensor]:
    """CenterNet focal loss on the centres; GIoU + L1 on log edge distances at every cell inside a box (weighted,
    each box counting once); cross-entropy on labels / sites and BCE on quality at the centre cell.

    ``site_weight_mask`` (B,) switches the site term off for images whose site cannot be read from position
    (mirrored augmentations).
    """
    parts = split_maps(maps, num_labels, num_sites)
    side = maps.shape[-1]
    heat_target = torch.stack([_gaussian_heatmap(t, side) for t in targets]).to(maps.device)
    prob = torch.sigmoid(parts["centre"]).clamp(1e-4, 1 - 1e-4)
    positive = heat_target.eq(1.0)
    pos_loss = -(torch.log(prob) * (1 - prob) ** 2)[positive].sum()
    neg_loss = -(torch.log(1 - prob) * prob**2 * (1 - heat_target) ** 4)[~positive].sum()
    n_pos = max(1, int(positive.sum()))
    losses = {"centre": (pos_loss + neg_loss) / n_pos}
    centres, labels, sites, site_ok = [], [], [], []
    for b, target in enumerate(targets):
        for box, label, site in zip(target.boxes.tolist(), target.labels.tolist(), target.sites.tolist(), strict=True):
            ix = int(np.clip((box[0] + box[2]) / 2 * side, 0, side - 1))
            iy = int(np.clip((box[1] + box[3]) / 2 * side, 0, side - 1))
            centres.append((b, iy, ix))
            labels.append(label)
            sites.append(site)
            site_ok.append(site_weight_mask is None or bool(site_weight_mask[b]))
    zero = maps.sum() * 0.0
    if not centres:
        return {**losses, "box": zero, "label": zero, "site": zero, "quality": zero}
    device = maps.device
    weight, truth = (t.to(device) for t in _regression_targets(targets, side))
    cell = _cell_centres(side, device)
    decoded = _decode_maps(parts)
    edges_target = torch.cat([cell - truth[:, :2] * side, truth[:, 2:] * side - cell], dim=1)
    l1 = (parts["log_edges"] - torch.log(edges_target.clamp(min=0.25))).abs().mean(dim=1)
    giou = generalized_box_iou_loss(_cells_as_rows(decoded), _cells_as_rows(truth), reduction="none").view_as(weight)
    losses["box"] = ((giou + l1) * weight).sum() / len(centres)
    cb, cy, cx = (torch.tensor(v, device=device) for v in zip(*centres, strict=True))
    label_t = torch.tensor(labels, device=device)
    losses["label"] = (
        F.cross_entropy(parts["label"][cb, :, cy, cx], label_t.clamp(min=0), reduction="none")[label_t >= 0].mean()
        if (label_t >= 0).any()
        else zero
    )
    site_t = torch.tensor(sites, device=device)
    keep = (site_t >= 0) & torch.tensor(site_ok, device=device)
    losses["site"] = F.cross_entropy(parts["site"][cb, :, cy, cx][keep], site_t[keep]) if keep.any() else zero
    centre_truth = torch.stack([t for target in targets for t in target.boxes]).to(device)
    iou = box_iou(decoded[cb, :, cy, cx].detach(), centre_truth).diagonal()
    losses["quality"] = F.binary_cross_entropy_with_logits(parts["quality"][cb, cy, cx], iou)
    return losses


def _cells_as_rows(boxes: torch.Tensor) -> torch.Tensor:
    """``(B, 4, H, W)`` box maps -> ``(B * H * W, 4)`` rows, in the order of ``weight.flatten()``."""
    return boxes.permute(0, 2, 3, 1).reshape(-1, 4)


def _cell_centres(side: int, device: torch.device) -> torch.Tensor:
    """``(1, 2, H, W)``: each cell's centre (x, y) in grid cells."""
    ys, xs = torch.meshgrid(torch.arange(side, device=device), torch.arange(side, device=device), indexing="ij")
    return torch.stack([xs, ys]).float().add(0.5).unsqueeze(0)


def _decode_maps(parts: dict[str, torch.Tensor]) -> torch.Tensor:
    """``(B, 4, H, W)``: the box (fractions of the image) each cell predicts, its centre minus / plus its edges."""
    side = parts["log_edges"].shape[-1]
    cell, edges = _cell_centres(side, parts["log_edges"].device), torch.exp(parts["log_edges"])
    return (torch.cat([cell - edges[:, :2], cell + edges[:, 2:]], dim=1) / side).clamp(0.0, 1.0)


def mirror_maps(maps: torch.Tensor) -> torch.Tensor:
    """Head output of a horizontally mirrored image -> the maps of the original image (left / right edges swapped)."""
    maps = maps.flip(-1).clone()
    maps[:, [1, 3]] = maps[:, [3, 1]]  # left and right edge distances swap
    return maps


def decode_proposals(
    maps: torch.Tensor,
    grid: torch.Tensor,
    k: int,
    num_labels: int,
    num_sites: int,
    mirrored: torch.Tensor | None = None,
) -> Proposals:
    """Top-``k`` centre peaks (3x3 max-pool suppression) decoded into boxes, label / site probabilities, features.

    With ``mirrored`` (the maps of the mirrored image, already mapped back by :func:`mirror_maps`) the centre,
    box and quality maps are averaged (test-time flip); labels and sites come from the unmirrored image, where
    left and right mean what they say.
    """
    parts = split_maps(maps, num_labels, num_sites)
    heat = torch.sigmoid(parts["centre"])
    if mirrored is not None:
        other = split_maps(mirrored, num_labels, num_sites)
        heat = (heat + torch.sigmoid(other["centre"])) / 2
        parts = {
            **parts,
            "log_edges": (parts["log_edges"] + other["log_edges"]) / 2,
            "quality": (parts["quality"] + other["quality"]) / 2,
        }
    batch, side = heat.shape[0], heat.shape[-1]
    peaks = heat * (F.max_pool2d(heat.unsqueeze(1), 3, stride=1, padding=1).squeeze(1) == heat)
    scores, flat = peaks.flatten(1).topk(k, dim=1)
    y, x = flat // side, flat % side
    b = torch.arange(batch, device=maps.device).unsqueeze(1).expand_as(flat)
    boxes = _decode_maps(parts).permute(0, 2, 3, 1)[b, y, x]
    return Proposals(
        boxes=boxes,
        scores=scores,
        quality=torch.sigmoid(parts["quality"][b, y, x]),
        label_probs=torch.softmax(parts["label"].permute(0, 2, 3, 1)[b, y, x], dim=-1),
        site_probs=torch.softmax(parts["site"].permute(0, 2, 3, 1)[b, y, x], dim=-1),
        features=grid.permute(0, 2, 3, 1)[b, y, x],
    )


def _windows(boxes: torch.Tensor, image_side: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``(N, 4)`` square windows (fractions) centred on ``boxes`` and their sides (:data:`REFINE_WINDOW`)."""
    centre = (boxes[:, :2] + boxes[:, 2:]) / 2
    longer = (boxes[:, 2:] - boxes[:, :2]).max(dim=1).values
    side = torch.clamp(REFINE_WINDOW * longer, min=REFINE_MIN_WINDOW / image_side)
    half = side.unsqueeze(1) / 2
    return torch.cat([centre - half, centre + half], dim=1), side


def _ordered(boxes: torch.Tensor) -> torch.Tensor:
    """Boxes with x1 <= x2 and y1 <= y2 (a regression may cross its edges early in training)."""
    return torch.cat([torch.minimum(boxes[..., :2], boxes[..., 2:]), torch.maximum(boxes[..., :2], boxes[..., 2:])], -1)


class BoxRefiner(nn.Module):
    """Second stage of the detector: each proposal's box re-measured on the input pixels around it.

    The proposal head regresses boxes from a stride-2 grid; for a lesion two or three pixels wide the grid's
    resolution is the error (held-out top-1 Acc@0.5 of such boxes 0.39). As in two-stage detectors (Faster R-CNN's
    RoI head), a small CNN reads a full-resolution crop (RoIAlign, torchvision's op) around the proposal and
    predicts its edges' corrections in units of the crop. Why our own: torchvision's RoI heads are tied to its
    Faster R-CNN models and their feature pyramids; this one reads the encoder's input image.
    """

    def __init__(self, channels: int, width: int = 32) -> None:
        super().__init__()

        def conv(inputs: int, outputs: int, stride: int = 1) -> nn.Sequential:
            return nn.Sequential(
                nn.Conv2d(inputs, outputs, 3, stride=stride, padding=1, bias=False),
                nn.GroupNorm(8, outputs),
                nn.ReLU(inplace=True),
            )

        self.cnn = nn.Sequential(conv(channels, width), conv(width, width), conv(width, 2 * width, 2))
        features = 2 * width * (REFINE_CROP // 2) ** 2 + 4  # the crop's 8 x 8 grid and the box within the crop
        self.out = nn.Sequential(nn.Linear(features, 4 * width), nn.ReLU(inplace=True), nn.Linear(4 * width, 4))
        self.out[-1].zero_init = True  # read by the model's weight init: an untrained refiner moves no box

    def forward(self, pixels: torch.Tensor, boxes: torch.Tensor) -> torch.Tensor:
        """``pixels`` (B, C, H, W), ``boxes`` (B, K, 4) fractions -> the refined boxes (B, K, 4) fractions."""
        batch, k = boxes.shape[:2]
        flat = boxes.reshape(-1, 4).to(pixels.dtype)
        side = pixels.shape[-1]
        windows, window_side = _windows(flat, side)
        image = torch.arange(batch, device=pixels.device, dtype=pixels.dtype).repeat_interleave(k).unsqueeze(1)
        crops = roi_align(pixels, torch.cat([image, windows * side], dim=1), REFINE_CROP, aligned=True)
        relative = (flat - windows[:, [0, 1, 0, 1]]) / window_side.unsqueeze(1)
        delta = self.out(torch.cat([self.cnn(crops).flatten(1), relative], dim=1))
        return _ordered(flat + delta * window_side.unsqueeze(1)).clamp(0.0, 1.0).view(batch, k, 4)


def refinement_pairs(
    proposals: torch.Tensor, targets: list[DetectionTarget], jitter: tuple[float, float] = (0.1, 0.25)
) -> tuple[torch.Tensor, torch.Tensor]:
    """Training pairs for :class:`BoxRefiner`: ``(B, M, 4)`` start boxes and the true boxes they should become.

    Per image: its proposals that overlap a true box (IoU >= :data:`REFINE_MIN_IOU`), moved by Gaussian noise of
    ``jitter[0]`` x their size, and each true box moved by ``jitter[1]`` x its size, so that the refiner learns from
    the first steps (when the proposals are still poor) and from starts like those it will meet. Rows are padded to
    the longest image with all-zero targets, which :func:`refinement_loss` leaves out.
    """
    per_image = []
    for boxes, target in zip(proposals.detach(), targets, strict=True):
        truth = target.boxes.to(boxes)
        if not len(truth):  # a lesion-free image: rows of padding only
            per_image.append((boxes.new_zeros(0, 4), boxes.new_zeros(0, 4)))
            continue
        best, which = box_iou(boxes, truth).max(dim=1)
        keep = best >= REFINE_MIN_IOU
        starts, ends = torch.cat([boxes[keep], truth]), torch.cat([truth[which[keep]], truth])
        size = (starts[:, 2:] - starts[:, :2]).clamp(min=1e-3).repeat(1, 2)
        noise = torch.cat([torch.full((int(keep.sum()), 1), jitter[0]), torch.full((len(truth), 1), jitter[1])])
        per_image.append((_ordered(starts + torch.randn_like(starts) * noise.to(starts) * size).clamp(0.0, 1.0), ends))
    width = max(len(s) for s, _ in per_image)
    starts = proposals.new_tensor([0.0, 0.0, 0.1, 0.1]).repeat(len(per_image), width, 1)  # padding: a valid box
    ends = proposals.new_zeros(len(per_image), width, 4)
    for n, (s, e) in enumerate(per_image):
        starts[n, : len(s)], ends[n, : len(e)] = s, e
    return starts, ends


def refinement_loss(refined: torch.Tensor, truth: torch.Tensor) -> torch.Tensor:
    """GIoU + smooth L1 (in units of 1/100 of the image) over the pairs of :func:`refinement_pairs`."""
    valid = truth.flatten(0, 1).abs().sum(dim=1) > 0
    if not valid.any():
        return refined.sum() * 0.0
    refined, truth = refined.flatten(0, 1)[valid], truth.flatten(0, 1)[valid]
    return generalized_box_iou_loss(refined, truth, reduction="mean") + F.smooth_l1_loss(refined * 100, truth * 100)


def box_numbers(boxes: torch.Tensor, grid: int = 100) -> torch.Tensor:
    """Fractions -> the integers 0..grid the LLM reads and writes (at least one unit wide and high)."""
    numbers = (boxes * grid).round().long().clamp(0, grid)
    x1, y1 = numbers[..., 0].clamp(max=grid - 1), numbers[..., 1].clamp(max=grid - 1)
    x2, y2 = torch.maximum(numbers[..., 2], x1 + 1), torch.maximum(numbers[..., 3], y1 + 1)
    return torch.stack([x1, y1, x2, y2], dim=-1)


__all__ = [
    "CENTRE_PRIOR_LOGIT",
    "BoxRefiner",
    "DetectionHead",
    "DetectionTarget",
    "Proposals",
    "box_numbers",
    "decode_proposals",
    "detection_loss",
    "mirror_maps",
    "refinement_loss",
    "refinement_pairs",
    "split_maps",
]
