"""What a client may send: ids, tags, params JSON and uploaded volumes, checked before any work starts.

MONAI Label's server joins client-given ids and tags onto folders, ``json.loads`` params without a guard and loads
uploads whatever their header claims. Everything here turns such input into a 4xx with a message (never a 5xx,
never a server path), so the app can refuse it before a file is read, written or decompressed.
"""

from __future__ import annotations

import email.message
import gzip
import io
import json
import math
import os
import re
import shutil
import sys
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import nibabel as nib
import pydicom
from fastapi import HTTPException
from pydicom.dataelem import RawDataElement
from requests_toolbelt.multipart.decoder import (
    ImproperBodyPartContentException,
    MultipartDecoder,
    NonMultipartContentTypeException,
)

from monailabel_evlf import parsing

# one id / tag alphabet for the whole server: no separators, no dot-dot, no leading dot or dash, bounded length
_ID = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.-]{0,127}")
_TAG = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]{0,63}")
VOLUME_SUFFIXES = (".nii.gz", ".nii", ".nrrd")
_NRRD_SIZES = {
    1: "signed char, int8, int8_t, uchar, unsigned char, uint8, uint8_t",
    2: "short, short int, signed short, signed short int, int16, int16_t, ushort, unsigned short, "
    "unsigned short int, uint16, uint16_t",
    4: "int, signed int, int32, int32_t, uint, unsigned int, uint32, uint32_t, float",
    8: "longlong, long long, long long int, signed long long, signed long long int, int64, int64_t, ulonglong, "
    "unsigned long long, unsigned long long int, uint64, uint64_t, double",
}
_NRRD_TYPES = {name.strip(): size for size, names in _NRRD_SIZES.items() for name in names.split(",")}
_CHUNK = 1 << 20
TRAIN_PARAMS = ("client_id", "gate", "label_tag", "method", "steps")  # 3D Slicer adds client_id
TRAIN_METHODS = ("sft+grpo", "sft", "grpo")  # the paper's recipe first
# absolute POSIX paths of two or more components, as readers and tracebacks print them
_PATH = re.compile(r"(?<![\w.:/])/(?:[\w.+@~-]+/)+[\w.+@~-]*")
# what a STOW-RS request may store: corrections training reads (SR measurement reports, SEG). Comprehensive 3D SR
# is what dcmjs (OHIF's SR writer) has long written; its 2D image regions are read like the others'.
STOW_SOP_CLASSES = {
    "1.2.840.10008.5.1.4.1.1.88.11": "SR",  # Basic Text SR
    "1.2.840.10008.5.1.4.1.1.88.22": "SR",  # Enhanced SR
    "1.2.840.10008.5.1.4.1.1.88.33": "SR",  # Comprehensive SR
    "1.2.840.10008.5.1.4.1.1.88.34": "SR",  # Comprehensive 3D SR
    "1.2.840.10008.5.1.4.1.1.66.4": "SEG",  # Segmentation Storage
}
MAX_STOW_INSTANCES = 16
_UID = re.compile(r"[0-9]+(\.[0-9]+)*")
# RFC 2046 boundary characters (no ';' or quotes, so the boundary can be handed on unquoted)
_BOUNDARY = re.compile(r"[0-9A-Za-z'()+_,\-./:=? ]{0,69}[0-9A-Za-z'()+_,\-./:=?]")
_PACKAGE_ROOT = str(Path(__file__).resolve().parents[2])
_INSTALL_ROOTS = tuple(sorted({_PACKAGE_ROOT, sys.prefix, tempfile.gettempdir()}, key=len, reverse=True))


@dataclass(frozen=True)
class Limits:
    """Per-request bounds; defaults in docs/security.md, set with ``--conf``."""

    max_voxels: int = 512 * 512 * 512
    max_upload_bytes: int = 1 << 30
    max_json_bytes: int = 1 << 20
    max_json_depth: int = 32
    max_options: int = 20
    max_text_chars: int = 2000
    max_rois: int = 256
    max_train_steps: int = 1000
    upload_timeout_s: int = 300


def scrub(text: str) -> str:
    """Server paths out of a message sent to a client."""
    for root in _INSTALL_ROOTS:
        text = text.replace(root, "<server>")
    return _PATH.sub("<path>", text)


def refuse(status: int, message: str) -> HTTPException:
    return HTTPException(status_code=status, detail=message)


def check_id(value: Any, what: str = "image id") -> str:
    """A datastore id: letters, digits, ``_ . -``; never a path, ``..``, or longer than 128 characters."""
    if not isinstance(value, str) or not _ID.fullmatch(value) or ".." in value:
        shown = value[:80] if isinstance(value, str) else value
        raise refuse(422, f"invalid {what} {shown!r}: use 1-128 letters, digits, '_', '.', '-' (no paths)")
    return value


def check_tag(value: Any) -> str:
    """A label tag (a folder name under labels/): letters, digits, ``_ -``, at most 64 characters."""
    if not isinstance(value, str) or not _TAG.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else value
        raise refuse(422, f"invalid label tag {shown!r}: use 1-64 letters, digits, '_', '-'")
    return value


def contained(root: str | os.PathLike[str], path: str | os.PathLike[str]) -> Path:
    """``path`` resolved, if it lies inside ``root`` (symlinks followed); 422 otherwise."""
    resolved, base = Path(path).resolve(), Path(root).resolve()
    if resolved != base and base not in resolved.parents:
        raise refuse(422, "path outside the datastore")
    return resolved


def _depth(value: Any) -> int:
    """Nesting depth of parsed JSON, without recursion."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        item, depth = stack.pop()
        deepest = max(deepest, depth)
        children = item.values() if isinstance(item, dict) else item if isinstance(item, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def parse_json_object(text: str | bytes | None, what: str, limits: Limits) -> dict[str, Any]:
    """Client JSON that must be an object: bounded size and depth; 422 with the reason otherwise."""
    if text is None or text == "" or text == b"":
        return {}
    if len(text) > limits.max_json_bytes:
        raise refuse(413, f"{what}: JSON larger than {limits.max_json_bytes} bytes")
    try:
        value = json.loads(text)
    except RecursionError:
        raise refuse(422, f"{what}: JSON nested deeper than {limits.max_json_depth} levels") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise refuse(422, f"{what} is not valid JSON: {exc}") from None
    return check_json_object(value, what, limits)


def check_json_object(value: Any, what: str, limits: Limits) -> dict[str, Any]:
    if not isinstance(value, dict):
        raise refuse(422, f"{what} must be a JSON object, got {type(value).__name__}")
    if _depth(value) > limits.max_json_depth:
        raise refuse(422, f"{what}: JSON nested deeper than {limits.max_json_depth} levels")
    return value


def parse_bool(value: Any, what: str) -> bool:
    """A boolean request param, read by the one shared parser; 422 naming it and the accepted words otherwise."""
    try:
        return parsing.parse_bool(value, f"'{what}'")
    except ValueError as exc:
        raise refuse(422, str(exc)) from None


def volume_suffix(name: str) -> str:
    """The volume format of a file name, or 415 for anything else (scripts, archives, 2D images...).

    One rule for every upload: 415 Unsupported Media Type for a format this server does not read, 422 for a file
    in a format it reads that is invalid (a junk header, a 2D volume, a truncated stream)."""
    lowered = name.lower()
    for suffix in VOLUME_SUFFIXES:
        if lowered.endswith(suffix):
            return suffix
    raise refuse(415, f"unsupported image format {Path(name).name[:80]!r}: use {', '.join(VOLUME_SUFFIXES)}")


def _gzip_size(path: Path, offset: int, limit: int) -> int:
    """Decompressed bytes of the gzip stream at ``offset``, reading no more than ``limit + 1`` of them."""
    with path.open("rb") as raw:
        raw.seek(offset)
        total = 0
        try:
            with gzip.GzipFile(fileobj=raw) as stream:
                while total <= limit:
                    chunk = stream.read(min(_CHUNK, limit + 1 - total))
                    if not chunk:
                        break
                    total += len(chunk)
        except (OSError, EOFError, gzip.BadGzipFile) as exc:
            raise refuse(422, f"corrupt or truncated gzip data ({type(exc).__name__})") from None
    return total


def _check_grid(shape: tuple[int, ...], limits: Limits) -> int:
    dims = list(shape)
    while len(dims) > 3 and dims[-1] == 1:
        dims.pop()
    if len(dims) != 3 or min(dims) < 1:
        raise refuse(422, f"need a 3D volume, the header says shape {tuple(shape)}")
    voxels = math.prod(dims)
    if voxels > limits.max_voxels:
        raise refuse(413, f"volume of {voxels} voxels exceeds the limit of {limits.max_voxels} (--conf max_voxels)")
    return voxels


def _check_nifti(path: Path, limits: Limits) -> None:
    try:
        header = nib.load(str(path)).header
        shape = tuple(int(n) for n in header.get_data_shape())
        itemsize = header.get_data_dtype().itemsize
        # a single-file NIfTI's data cannot start inside the header (+4 extension bytes); writers may leave 0
        offset = max(int(header.get_data_offset()), int(header["sizeof_hdr"]) + 4)
    except Exception as exc:  # nibabel raises many types on a junk header; the header alone is read here
        raise refuse(422, f"cannot read the image: not a NIfTI header ({type(exc).__name__})") from None
    expected = offset + _check_grid(shape, limits) * itemsize
    if path.name.lower().endswith(".gz"):
        size = _gzip_size(path, 0, expected)
        if size > expected:
            raise refuse(422, "the gzip data is larger than the NIfTI header says (refused as a decompression bomb)")
    else:
        size = path.stat().st_size
    if size < expected:
        raise refuse(422, f"truncated NIfTI: {size} of {expected} bytes")


def _nrrd_header(path: Path) -> tuple[dict[str, str], int]:
    fields: dict[str, str] = {}
    with path.open("rb") as handle:
        magic = handle.readline(64)
        if not magic.startswith(b"NRRD000"):
            raise refuse(422, "not an NRRD file (no NRRD magic line)")
        while True:
            line = handle.readline(4096)
            if handle.tell() > 65536:
                raise refuse(422, "NRRD header longer than 64 KiB")
            if not line or line in (b"\n", b"\r\n"):
                return fields, handle.tell()
            key, sep, value = line.decode("latin-1").rstrip("\r\n").partition(": ")  # "key:=value" has no ": "
            if sep and not key.startswith("#"):
                fields[key.strip().lower()] = value.strip()


def _check_nrrd(path: Path, limits: Limits) -> None:
    fields, offset = _nrrd_header(path)
    if "data file" in fields or "datafile" in fields:
        raise refuse(422, "NRRD with a detached 'data file' is refused: send a single .nrrd with its data")
    try:
        shape = tuple(int(n) for n in fields["sizes"].split())
        itemsize = _NRRD_TYPES[fields["type"].lower()]
    except (KeyError, ValueError):
        raise refuse(422, "NRRD header needs valid 'sizes' and 'type' fields") from None
    expected = _check_grid(shape, limits) * itemsize
    encoding = fields.get("encoding", "raw").lower()
    if encoding in ("gzip", "gz"):
        size = _gzip_size(path, offset, expected)
        if size > expected:
            raise refuse(422, "the gzip data is larger than the NRRD header says (refused as a decompression bomb)")
    elif encoding == "raw":
        size = path.stat().st_size - offset
    else:
        raise refuse(415, f"NRRD encoding {encoding!r} is not read here: use raw or gzip")
    if size < expected:
        raise refuse(422, f"truncated NRRD: {size} of {expected} data bytes")


def check_volume_file(path: str | os.PathLike[str], limits: Limits, name: str | None = None) -> None:
    """A 3D NIfTI / NRRD file whose header is honest: voxel cap, no detached data, no bomb, not truncated.

    Only headers and a bounded decompression are read here, so a lying header costs nothing to refuse."""
    path = Path(path)
    suffix = volume_suffix(name or path.name)
    if not path.is_file() or path.stat().st_size == 0:
        raise refuse(422, "the uploaded file is empty")
    if suffix == ".nrrd":
        _check_nrrd(path, limits)
    else:
        _check_nifti(path, limits)


def copy_limited(source: BinaryIO, destination: Path, limit: int) -> int:
    """Copy an upload stream to ``destination``; 413 once it passes ``limit`` bytes."""
    total = 0
    with destination.open("wb") as out:
        while chunk := source.read(_CHUNK):
            total += len(chunk)
            if total > limit:
                raise refuse(413, f"upload larger than {limit} bytes (--conf max_upload_mb)")
            out.write(chunk)
    return total


UPLOAD_PREFIX = "evlf-upload-"


@contextmanager
def upload_dir() -> Iterator[Path]:
    """A private temp folder for one request's uploads, removed on every path out. Its name carries the server's
    pid, so a server starting after a kill -9 can tell its dead predecessor's folders (:func:`remove_stale_uploads`)
    from those of another server sharing the temp folder."""
    folder = Path(tempfile.mkdtemp(prefix=f"{UPLOAD_PREFIX}{os.getpid()}-"))
    try:
        yield folder
    finally:
        shutil.rmtree(folder, ignore_errors=True)


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process
        return True
    return True


def remove_stale_uploads(folder: str | os.PathLike[str] | None = None) -> int:
    """Remove the upload folders of servers that are no longer running (a kill -9 mid-upload leaves one); a
    live server's folders, and folders of other programs, are left alone. The number removed."""
    removed = 0
    for path in Path(folder or tempfile.gettempdir()).glob(f"{UPLOAD_PREFIX}*-*"):
        pid = path.name[len(UPLOAD_PREFIX) :].split("-", 1)[0]
        if path.is_dir() and not path.is_symlink() and pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(path, ignore_errors=True)
            removed += 1
    return removed


def check_train_params(params: dict[str, Any], config: Any, limits: Limits) -> dict[str, Any]:
    """The train request a client may send (:data:`TRAIN_PARAMS`); 422 for anything else, before the child starts."""
    unknown = sorted(set(params) - set(TRAIN_PARAMS))
    if unknown:
        names = ", ".join(map(repr, unknown))
        raise refuse(422, f"unknown train parameter(s) {names}; use {', '.join(TRAIN_PARAMS)}")
    if params.get("method", config.train_method) not in TRAIN_METHODS:
        raise refuse(422, f"'method' must be one of {', '.join(TRAIN_METHODS)}, got {params['method']!r}")
    steps = params.get("steps", config.train_steps)
    if type(steps) is not int or not 1 <= steps <= limits.max_train_steps:
        raise refuse(422, f"'steps' must be an integer in 1..{limits.max_train_steps} (--conf max_train_steps)")
    check_tag(params.get("label_tag", "final"))
    if not isinstance(params.get("client_id") or "", str):
        raise refuse(422, "'client_id' must be a string")
    if "gate" in params:
        parse_bool(params["gate"], "gate")
    return params


# -- STOW-RS bodies (OHIF's "Create SR" through MONAI Label's DICOMweb proxy) ------------------------------------


def check_uid(value: Any, what: str) -> str:
    """A DICOM UID: digits and dots, at most 64 characters (also what may go into a QIDO filter or a URL)."""
    if not isinstance(value, str) or len(value) > 64 or not _UID.fullmatch(value):
        shown = value[:80] if isinstance(value, str) else value
        raise refuse(422, f"invalid {what} {shown!r}: a DICOM UID is digits and dots, at most 64 characters")
    return value


def stow_boundary(content_type: str | None) -> str:
    """The multipart boundary of a STOW-RS request, or 415 unless it is ``multipart/related;
    type="application/dicom"`` (PS3.18; DICOM JSON / XML metadata with bulk data is not read here)."""
    header = email.message.Message()
    header["content-type"] = content_type or ""
    want = 'send multipart/related; type="application/dicom" with one DICOM file per part'
    if header.get_content_type() != "multipart/related":
        raise refuse(415, f"STOW-RS takes multipart/related bodies, got {str(content_type)[:80]!r}: {want}")
    kind = header.get_param("type")
    if kind is not None and str(kind).lower() != "application/dicom":
        raise refuse(415, f"STOW-RS parts of type {str(kind)[:80]!r} are not read here: {want}")
    boundary = header.get_boundary()
    if not boundary or not _BOUNDARY.fullmatch(boundary):
        raise refuse(415, f"multipart/related without a valid boundary parameter: {want}")
    return boundary


def _media_type(value: bytes | None) -> str:
    header = email.message.Message()
    header["content-type"] = (value or b"").decode("latin-1")
    return header.get_content_type() if value else ""


def _truncated(dataset: pydicom.Dataset) -> bool:
    """Whether an element still raw from reading holds fewer bytes than its length says: pydicom reads a file cut
    inside its last value without an error, so a truncated upload would otherwise pass."""
    raws = [dataset.get_item(tag) for tag in dataset.keys()]  # noqa: SIM118 (iterating the dataset converts)
    return any(
        isinstance(raw, RawDataElement)
        and raw.value is not None
        and raw.length != 0xFFFFFFFF  # undefined length: sequences, read as they come
        and len(raw.value) != raw.length
        for raw in raws
    )


def read_stow_body(body: bytes, boundary: str, study_uid: str | None = None) -> list[pydicom.Dataset]:
    """The DICOM objects of a STOW-RS body: each part ``application/dicom`` (else 415), a DICOM file pydicom reads
    whole, of a class in :data:`STOW_SOP_CLASSES` with its modality and valid UIDs, in ``study_uid`` when the URL
    names one (else 422); at most :data:`MAX_STOW_INSTANCES` parts (413). Whether training can use an object is
    the datastore's check, after this one."""
    marker = b"--" + boundary.encode()
    if not (body.startswith(marker) or body.startswith(b"\r\n" + marker)) or b"\r\n" + marker + b"--" not in body:
        raise refuse(422, "malformed multipart body: it must start with the boundary and end with its close")
    try:
        parts = MultipartDecoder(body, f"multipart/related; boundary={boundary}").parts
    except (ImproperBodyPartContentException, NonMultipartContentTypeException, ValueError):
        raise refuse(422, "malformed multipart body: a part lacks its header block") from None
    if not parts:
        raise refuse(422, "the STOW-RS body holds no DICOM part")
    if len(parts) > MAX_STOW_INSTANCES:
        raise refuse(413, f"{len(parts)} parts in one STOW-RS request; the limit is {MAX_STOW_INSTANCES}")
    datasets = []
    for n, part in enumerate(parts, 1):
        media = _media_type(part.headers.get(b"content-type"))
        if media != "application/dicom":
            raise refuse(415, f"part {n} has Content-Type {media or 'none'!r}; each part must be application/dicom")
        try:
            dataset = pydicom.dcmread(io.BytesIO(part.content))
            if _truncated(dataset):
                raise ValueError("an element is shorter than its declared length")
            dataset.walk(lambda *_: None)  # converts every element now: a malformed value is refused here, not later
        except Exception:  # pydicom raises many error types on a crafted or truncated file; the bytes alone are read
            raise refuse(
                422, f"part {n} is not a DICOM file pydicom can read (PS3.10, with its 'DICM' header)"
            ) from None
        sop_class = str(dataset.get("SOPClassUID", ""))
        modality = STOW_SOP_CLASSES.get(sop_class)
        if modality is None:
            name = pydicom.uid.UID(sop_class).name if sop_class else "no SOP class"
            raise refuse(
                422, f"part {n} is {name[:80]!r}: only DICOM SR (Basic, Enhanced, Comprehensive) and SEG are stored"
            )
        if dataset.get("Modality") != modality:
            raise refuse(
                422, f"part {n}: a {modality} object needs Modality {modality}, got {dataset.get('Modality')!r}"
            )
        for keyword in ("StudyInstanceUID", "SeriesInstanceUID", "SOPInstanceUID"):
            check_uid(str(dataset.get(keyword, "")), f"part {n} {keyword}")
        if study_uid is not None and dataset.StudyInstanceUID != study_uid:
            raise refuse(422, f"part {n} belongs to study {dataset.StudyInstanceUID}, not to {study_uid} of the URL")
        datasets.append(dataset)
    return datasets
