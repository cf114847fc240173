"""The app's ``--conf`` options: parsed and checked once at start-up, so a typo stops the server with a message
that names the option instead of failing on the first request.

MONAI Label hands every ``--conf key value`` pair to the app as strings; :func:`parse_app_config` turns them into
one typed :class:`AppConfig`. Unknown keys are rejected (a misspelt ``bach_size`` would otherwise be silently
ignored), except MONAI Label's own keys that it passes through to every app.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field, fields

from monailabel_evlf import paths
from monailabel_evlf.app.security import TRAIN_METHODS, Limits
from monailabel_evlf.imaging.windowing import MODEL_WINDOW, resolve_window, window_channels
from monailabel_evlf.parsing import parse_bool
from monailabel_evlf.tasks.labels import NORMAL_LABEL

DEMO_MODEL_DIR = paths.demo_model_dir()
DEFAULT_LABELS: tuple[str, ...] = ("cyst", "hyperdense lesion", "ring-enhancing lesion")
DTYPES = ("float32", "float16", "bfloat16")
OUTPUTS = ("markups", "labelmap", "json", "dicom_sr", "dicom_seg")
# keys MONAI Label itself (or its sample apps' habits) may pass to any app; accepted and ignored here
PASSTHROUGH_KEYS = frozenset(
    {"models", "preload", "server_mode", "skip_scoring", "skip_strategies", "skip_trainers", "epistemic"}
)
_DEVICE = re.compile(r"^(cpu|mps|cuda(:\d+)?)$")


class ConfigError(ValueError):
    """A bad ``--conf`` option; the message starts with the option's name."""

    def __init__(self, option: str, message: str) -> None:
        super().__init__(f"--conf {option}: {message}")
        self.option = option


@dataclass(frozen=True)
class AppConfig:
    """Everything the EVLF app can be told with ``--conf``; defaults give a working offline demo."""

    backend: str = "evlf"  # registered backend name or "package.module:Class"
    model: str = "demo"  # preset name ("demo", "tiny", ...), Hugging Face id or local directory
    device: str = "cpu"
    dtype: str = "float32"
    trust_remote_code: bool = False
    adapters: str = ""  # adapter registry root (default: <app_dir>/model/adapters)
    modality: str = "CT"
    labels: tuple[str, ...] = DEFAULT_LABELS  # diagnosis vocabulary ("normal" is always added)
    findings: tuple[str, ...] = ()  # grounding targets (default: the labels)
    slice_axis: int | None = None  # None: the volume axis closest to patient S-I (axial)
    slice_stride: int = 1
    max_slices: int = 64
    window: str = "model"  # the model's own input window, else a CT preset / "level,width" (HU), or three
    image_size: int = 96  # rendered slice width and height in pixels
    batch_size: int = 8  # slices per backend.generate call
    max_new_tokens: int = 96
    min_slices: int = 2  # a 3D box needs detections on this many slices
    min_box_score: float | None = None  # 3D boxes scored below are not reported (None: PipelineConfig's default)
    output: str = "markups"  # default grounding output
    samples: int = 4  # sampled answers per slice for active-learning disagreement
    train_steps: int = 30  # GRPO steps (SFT epochs for train_method sft), as in learning-loop.yaml
    train_method: str = "sft+grpo"  # the paper's SFT then GRPO, or "sft" / "grpo" alone
    detector_steps: int = 400  # detection-connector models: steps fitting the detector on the corrections first; 0 off
    torch_threads: int = 0  # torch intra-op threads; 0 = torch's default (small models on busy CPUs: 1)
    auto_scoring: bool = False  # MONAI Label's default re-scores all images in a child process at start-up
    # security and resource limits (docs/security.md)
    max_voxels: int = Limits.max_voxels
    max_upload_mb: int = Limits.max_upload_bytes >> 20
    max_options: int = Limits.max_options
    max_text_chars: int = Limits.max_text_chars
    max_rois: int = Limits.max_rois
    max_train_steps: int = Limits.max_train_steps
    max_queued_requests: int = 4  # infer requests waiting for the model; more get 429
    infer_timeout_s: int = 600  # wall-clock seconds one infer request may take (waiting included); then 504
    upload_timeout_s: int = Limits.upload_timeout_s  # seconds for a request's whole body to arrive; then 408
    cors_origins: tuple[str, ...] = ()  # allowed browser origins besides the server's own loopback origin
    auth_token_file: str = ""  # a file holding the shared secret: turns bearer-token authentication on
    logs_endpoint: bool = False  # MONAI Label's /logs/ (the server log) is off unless enabled
    extra: dict[str, str] = field(default_factory=dict)  # backend-specific options: "backend.<key>" conf entries

    @property
    def vocabulary(self) -> tuple[str, ...]:
        return (*self.labels, NORMAL_LABEL) if NORMAL_LABEL not in self.labels else self.labels

    @property
    def limits(self) -> Limits:
        return Limits(
            max_voxels=self.max_voxels,
            max_upload_bytes=self.max_upload_mb << 20,
            max_options=self.max_options,
            max_text_chars=self.max_text_chars,
            max_rois=self.max_rois,
            max_train_steps=self.max_train_steps,
            upload_timeout_s=self.upload_timeout_s,
        )

    @property
    def targets(self) -> tuple[str, ...]:
        return self.findings or tuple(label for label in self.labels if label != NORMAL_LABEL)

    def window_for(self, backend: object) -> str:
        """The configured window, or for ``model`` the backend's ``input_window`` (what it was trained on)."""
        return resolve_window(self.window, getattr(backend, "input_window", None))


def _fraction(option: str, value: str) -> float:
    try:
        number = float(value)
    except ValueError:
        raise ConfigError(option, f"expected a number in [0, 1]; got {value!r}") from None
    if not 0.0 <= number <= 1.0:
        raise ConfigError(option, f"must be in [0, 1]; got {value!r}")
    return number


def _int(option: str, value: str, minimum: int) -> int:
    try:
        number = int(value)
    except ValueError:
        raise ConfigError(option, f"expected an integer, got {value!r}") from None
    if number < minimum:
        raise ConfigError(option, f"must be >= {minimum}, got {number}")
    return number


def _bool(option: str, value: str) -> bool:
    try:
        return parse_bool(value, option)
    except ValueError as exc:
        raise ConfigError(option, str(exc)) from None


def _names(option: str, value: str) -> tuple[str, ...]:
    names = tuple(dict.fromkeys(part.strip() for part in value.split(",") if part.strip()))
    if not names:
        raise ConfigError(option, "needs at least one comma-separated name")
    return names


def _choice(option: str, value: str, allowed: tuple[str, ...]) -> str:
    if value not in allowed:
        raise ConfigError(option, f"must be one of {', '.join(allowed)}; got {value!r}")
    return value


def check_window(option: str, value: str, modality: str) -> str:
    """``model`` (the window the model was trained with) or windows the imaging module understands: a CT preset,
    ``auto``, ``percentile[:lo,hi]`` or ``level,width``, one or three ``/``-separated (one per RGB channel)."""
    if value == MODEL_WINDOW:
        return value
    try:
        window_channels(value, modality)
    except ValueError as exc:
        raise ConfigError(option, str(exc)) from None
    return value


def parse_app_config(conf: Mapping[str, str]) -> AppConfig:
    """``--conf`` strings -> :class:`AppConfig`; raises :class:`ConfigError` naming the first bad option."""
    known = {f.name for f in fields(AppConfig)} - {"extra"}
    values: dict[str, object] = {}
    extra: dict[str, str] = {}
    for key, raw in conf.items():
        value = str(raw).strip()
        if key.startswith("backend."):
            extra[key.removeprefix("backend.")] = value
            continue
        if key in PASSTHROUGH_KEYS:
            continue
        if key not in known:
            raise ConfigError(key, f"unknown option; known: {', '.join(sorted(known))}, backend.<name>")
        if key in ("backend", "model", "modality", "adapters", "auth_token_file"):
            if not value:
                raise ConfigError(key, "must not be empty")
            values[key] = value
        elif key == "device":
            if not _DEVICE.match(value):
                raise ConfigError(key, f"expected cpu, cuda, cuda:N or mps; got {value!r}")
            values[key] = value
        elif key == "dtype":
            values[key] = _choice(key, value, DTYPES)
        elif key in ("trust_remote_code", "auto_scoring", "logs_endpoint"):
            values[key] = _bool(key, value)
        elif key in ("labels", "findings", "cors_origins"):
            values[key] = _names(key, value)
        elif key == "slice_axis":
            values[key] = None if value == "auto" else int(_choice(key, value, ("auto", "0", "1", "2")))
        elif (
            key in ("slice_stride", "max_slices", "batch_size", "max_new_tokens", "min_slices", "samples")
            or (key.startswith("max_"))
            or key in ("infer_timeout_s", "upload_timeout_s")
        ):
            values[key] = _int(key, value, 1)
        elif key in ("torch_threads", "detector_steps"):
            values[key] = _int(key, value, 0)
        elif key == "image_size":
            values[key] = _int(key, value, 16)
        elif key == "min_box_score":
            values[key] = _fraction(key, value)
        elif key == "train_steps":
            values[key] = _int(key, value, 1)
        elif key == "window":
            values[key] = check_window(key, value, str(conf.get("modality", "CT")))
        elif key == "output":
            values[key] = _choice(key, value, OUTPUTS)
        elif key == "train_method":
            values[key] = _choice(key, value, TRAIN_METHODS)
    return AppConfig(**values, extra=extra)


def resolve_model(config: AppConfig) -> tuple[str, str]:
    """The model to load and a note for the app description.

    ``demo`` is the committed offline demo model; until it exists the ``tiny`` preset (random weights, built on
    the fly) stands in, and the description says so rather than pretending to be trained.
    """
    if config.model != "demo":
        return config.model, ""
    if (DEMO_MODEL_DIR / "config.json").is_file():
        return str(DEMO_MODEL_DIR), ""
    return "tiny", f"demo model not found at {DEMO_MODEL_DIR}; serving the untrained 'tiny' preset"
