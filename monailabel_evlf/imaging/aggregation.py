"""Link per-slice 2D detections into 3D boxes: what a reader does when scrolling through a lesion.

A vision-language model answers one slice at a time. A lesion seen on neighbouring slices at about the same place
is one finding; a box on a single slice with nothing above or below is more likely a false alarm, so short tracks
are dropped by default.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Literal

import numpy as np
from monai.data.box_utils import non_max_suppression

from monailabel_evlf.imaging.geometry import VoxelBox, box_iou_2d

__all__ = ["extend_into_weak_detections", "link_slice_detections"]


@dataclass
class _Track:
    members: list[VoxelBox] = field(default_factory=list)

    @property
    def last(self) -> VoxelBox:
        return self.members[-1]


def _plane(box: VoxelBox, axes: tuple[int, int]) -> np.ndarray:
    a, b = axes
    return np.array([box.lo[a], box.lo[b], box.hi[a], box.hi[b]])


def _slice_index(box: VoxelBox, axis: int) -> int:
    lo, hi = box.lo[axis], box.hi[axis]
    if hi - lo != 1 or lo != round(lo):
        raise ValueError(f"detection {box.lo.tolist()}..{box.hi.tolist()} is not one whole slice along axis {axis}")
    return int(lo)


def link_slice_detections(
    detections: Sequence[VoxelBox],
    axis: int,
    *,
    iou_threshold: float = 0.3,
    max_gap: int = 1,
    min_slices: int = 2,
    extent: Literal["union", "median"] = "union",
    nms_threshold: float = 0.3,
) -> list[VoxelBox]:
    """3D boxes from one-slice-thick detections (``slicing.slice_box_to_voxel_box`` output) along ``axis``.

    Slices are visited in order; a detection joins the track whose latest box lies at most ``max_gap`` skipped
    slices before it with the highest in-plane IoU >= ``iou_threshold`` (each track takes one detection per slice),
    else it starts a new track. Labels do not split tracks: a lesion is one finding even where the model names its
    kind differently on some slices, and the track's label is the score-weighted vote of its members. A track
    becomes a box spanning its first to last slice (gaps included); its in-plane extent is the ``"union"`` of member
    boxes (the lesion's largest cross-section, what a ground-truth 3D box is) or the member-wise ``"median"``
    (robust to one stray box). Its score is the mean of member scores (a missing score counts as 1.0), so a track
    the model kept seeing with confidence ranks first. Tracks with fewer than ``min_slices`` detections are dropped
    (``min_slices=1`` keeps them); finally 3D non-maximum suppression removes boxes overlapping a better one by IoU
    > ``nms_threshold``.
    """
    if axis not in (0, 1, 2):
        raise ValueError(f"axis must be 0, 1 or 2, got {axis}")
    if max_gap < 0 or min_slices < 1 or not 0 <= iou_threshold <= 1 or not 0 <= nms_threshold <= 1:
        raise ValueError("need max_gap >= 0, min_slices >= 1 and thresholds in [0, 1]")
    if extent not in ("union", "median"):
        raise ValueError(f"extent must be 'union' or 'median', got {extent!r}")
    plane_axes = tuple(n for n in range(3) if n != axis)
    if not detections:
        return []
    tracks = _link(list(detections), axis, plane_axes, iou_threshold, max_gap)
    linked = [_track_box(t, axis, plane_axes, extent) for t in tracks if len(t.members) >= min_slices]
    return sorted(_nms(linked, nms_threshold), key=lambda b: -_score(b))


def _link(
    detections: list[VoxelBox], axis: int, plane_axes: tuple[int, int], iou_threshold: float, max_gap: int
) -> list[_Track]:
    tracks: list[_Track] = []
    detections = sorted(detections, key=lambda b: (_slice_index(b, axis), -_score(b)))
    for k in sorted({_slice_index(b, axis) for b in detections}):
        on_slice = [b for b in detections if _slice_index(b, axis) == k]
        open_tracks = [t for t in tracks if 1 <= k - _slice_index(t.last, axis) <= max_gap + 1]
        iou = box_iou_2d(
            np.stack([_plane(b, plane_axes) for b in on_slice]),
            np.array([_plane(t.last, plane_axes) for t in open_tracks]).reshape(-1, 4),
        )
        taken: set[int] = set()
        for n, box in enumerate(on_slice):  # best-scoring detections pick their track first
            candidates = [
                (iou[n, m], m) for m in range(len(open_tracks)) if m not in taken and iou[n, m] >= iou_threshold
            ]
            if candidates:
                _, m = max(candidates)
                taken.add(m)
                open_tracks[m].members.append(box)
            else:
                tracks.append(_Track([box]))
    return tracks


def _track_box(track: _Track, axis: int, plane_axes: tuple[int, int], extent: str) -> VoxelBox:
    planes = np.stack([_plane(b, plane_axes) for b in track.members])
    if extent == "union":
        plane = np.concatenate([planes[:, :2].min(axis=0), planes[:, 2:].max(axis=0)])
    else:
        plane = np.median(planes, axis=0)
    lo, hi = np.empty(3), np.empty(3)
    a, b = plane_axes
    lo[[a, b]], hi[[a, b]] = plane[:2], plane[2:]
    slices = [_slice_index(m, axis) for m in track.members]
    lo[axis], hi[axis] = min(slices), max(slices) + 1
    score = float(np.mean([_score(m) for m in track.members]))
    votes: dict[str | None, float] = {}
    for member in track.members:
        votes[member.label] = votes.get(member.label, 0.0) + _score(member)
    label = max(votes, key=lambda name: (votes[name], name is not None))
    return VoxelBox(lo=lo, hi=hi, label=label, score=score)


def extend_into_weak_detections(
    boxes: Sequence[VoxelBox],
    weak: Sequence[VoxelBox],
    axis: int,
    *,
    min_score: float,
    max_extend: int = 2,
) -> list[VoxelBox]:
    """Hysteresis along ``axis``: grow each 3D box slice by slice into weak one-slice detections that continue it.

    A lesion's first and last slices show a small, faint cap; the model often leaves it unreported while its
    detector still puts a low-scored region there. From each end of a box, the next slice is taken into the box
    while it holds a weak detection (score >= ``min_score``) whose in-plane centre lies inside the box's section,
    up to ``max_extend`` slices per end (Canny's strong seeds and weak continuations). In-plane extent, label and
    score are unchanged: a cap lies inside the section and adds no evidence that the finding exists.
    """
    if axis not in (0, 1, 2) or max_extend < 0:
        raise ValueError(f"need axis in (0, 1, 2) and max_extend >= 0, got {axis}, {max_extend}")
    plane_axes = tuple(n for n in range(3) if n != axis)
    centres: dict[int, list[np.ndarray]] = {}  # per slice, the in-plane centres of the weak detections
    for box in weak:
        if _score(box) >= min_score:
            plane = _plane(box, plane_axes)
            centres.setdefault(_slice_index(box, axis), []).append((plane[:2] + plane[2:]) / 2)
    out = []
    for box in boxes:
        section = _plane(box, plane_axes)
        lo, hi = int(box.lo[axis]), int(box.hi[axis])
        for _ in range(max_extend):
            if not _any_inside(centres.get(lo - 1, []), section):
                break
            lo -= 1
        for _ in range(max_extend):
            if not _any_inside(centres.get(hi, []), section):
                break
            hi += 1
        new_lo, new_hi = box.lo.copy(), box.hi.copy()
        new_lo[axis], new_hi[axis] = lo, hi
        out.append(VoxelBox(lo=new_lo, hi=new_hi, label=box.label, score=box.score))
    return out


def _any_inside(points: Sequence[np.ndarray], section: np.ndarray) -> bool:
    return any(np.all(section[:2] <= p) and np.all(p <= section[2:]) for p in points)


def _score(box: VoxelBox) -> float:
    return 1.0 if box.score is None else box.score


def _nms(boxes: list[VoxelBox], threshold: float) -> list[VoxelBox]:
    if len(boxes) < 2:
        return boxes
    keep = non_max_suppression(
        np.stack([b.as_array() for b in boxes]), np.array([_score(b) for b in boxes]), nms_thresh=threshold
    )
    return [boxes[int(n)] for n in np.asarray(keep)]
