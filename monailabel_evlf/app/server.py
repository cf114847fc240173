"""The EVLF app's guard around MONAI Label's FastAPI server, installed by the app when the server starts it.

MONAI Label 0.8.5 builds its FastAPI app at import (CORS echoing any origin with credentials, ``json.loads`` on
raw params, inference on the event loop, ``/logs/`` open). The app cannot change that module, but it is built
inside the server's lifespan, so it can (1) put its own routes in front of MONAI Label's for every endpoint that
takes client input (same paths, same parameters, so 3D Slicer and OHIF work unchanged) and (2) wrap the ASGI
stack in :class:`Guard`: host / origin / client checks, optional bearer-token auth, body caps, and error bodies
without tracebacks or server paths. See docs/security.md.
"""

from __future__ import annotations

import asyncio
import contextvars
import functools
import hmac
import ipaddress
import json
import logging
import os
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from contextlib import ExitStack
from pathlib import Path
from typing import TYPE_CHECKING, Any

import jwt
import nibabel as nib
import numpy as np
import requests
from fastapi import APIRouter, BackgroundTasks, Depends, FastAPI, File, Form, HTTPException, Request, UploadFile
from fastapi.responses import FileResponse, JSONResponse
from fastapi.security import OAuth2PasswordRequestForm
from monailabel.config import settings
from monailabel.endpoints import activelearning as ml_activelearning
from monailabel.endpoints import infer as ml_infer
from monailabel.endpoints import proxy as ml_proxy
from monailabel.endpoints import scoring as ml_scoring
from monailabel.endpoints import train as ml_train
from monailabel.endpoints.user.auth import RBAC, User
from starlette.background import BackgroundTask
from starlette.concurrency import run_in_threadpool
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from monailabel_evlf.app.config import AppConfig
from monailabel_evlf.app.datastore import label_suffix
from monailabel_evlf.app.dicomweb import EVLFDICOMwebDatastore
from monailabel_evlf.app.ohif import ohif_router
from monailabel_evlf.app.security import (
    check_id,
    check_json_object,
    check_tag,
    check_train_params,
    check_uid,
    check_volume_file,
    copy_limited,
    parse_json_object,
    read_stow_body,
    refuse,
    remove_stale_uploads,
    scrub,
    stow_boundary,
    upload_dir,
    volume_suffix,
)
from monailabel_evlf.imaging.volume import load_volume  # imports ITK on its first read (warm_imaging)

if TYPE_CHECKING:
    from monailabel.interfaces.app import MONAILabelApp

logger = logging.getLogger(__name__)

LOOPBACK_HOSTS = ("127.0.0.1", "localhost", "::1")
# endpoints the EVLF app does not serve (no WSI, no batch jobs, no model file: adapters come from training) or that
# reset the server from outside; MONAI Label's PUT /model/ answered 500 and left its upload in the temp folder
BLOCKED_PREFIXES = ("/batch/", "/infer/wsi", "/wsi_infer", "/reload", "/model/")
LOG_PREFIX = "/logs"
OPEN_PATHS = {("GET", "/auth/"), ("POST", "/auth/token"), ("GET", "/favicon.ico")}
# OHIF's own files (its build and app-config.js; no study data) load without the token, so the browser can start
# OHIF and OHIF then sends the token on its DICOMweb calls (app/ohif.py); every /proxy/dicom call needs it
OHIF_PREFIX = "/ohif"
TOKEN_HOURS = 12
_MULTIPART_SLACK = 1 << 20
_ERROR_BODY_MAX = 1 << 16
# -- authentication ------------------------------------------------------------------------------------------------


class TokenAuth:
    """Opt-in shared-secret auth spoken the way 3D Slicer's MONAI Label module logs in: ``GET /auth/`` says it is
    on, ``POST /auth/token`` (any username, the secret as password) returns a signed 12-hour token, every other
    call sends ``Authorization: Bearer <token>``; the secret itself is also accepted as a bearer token (OHIF,
    scripts)."""

    def __init__(self, secret: str) -> None:
        if len(secret) < 16:
            raise ValueError("the auth token file must hold a secret of at least 16 characters")
        self.secret = secret

    def issue(self, username: str, password: str) -> str | None:
        if not hmac.compare_digest(password.encode(), self.secret.encode()):
            return None
        claims = {"sub": username or "user", "exp": int(time.time()) + TOKEN_HOURS * 3600}
        return jwt.encode(claims, self.secret, algorithm="HS256")

    def user(self, authorization: str | None) -> str | None:
        """The user a bearer header authenticates, or None."""
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not token:
            return None
        if hmac.compare_digest(token.strip().encode(), self.secret.encode()):
            return "token"
        try:
            return str(jwt.decode(token.strip(), self.secret, algorithms=["HS256"])["sub"])
        except (jwt.InvalidTokenError, KeyError):
            return None


def load_auth(config: AppConfig) -> TokenAuth | None:
    if not config.auth_token_file:
        return None
    if settings.MONAI_LABEL_AUTH_ENABLE:
        raise ValueError("--conf auth_token_file and MONAI_LABEL_AUTH_ENABLE are two auth modes: choose one")
    return TokenAuth(Path(config.auth_token_file).read_text().strip())


def auth_router(auth: TokenAuth) -> APIRouter:
    router = APIRouter(prefix="/auth", tags=["Auth"])

    @router.get("/")
    def enabled() -> dict[str, Any]:
        return {"enabled": True, "client_id": "evlf", "realm": ""}

    @router.post("/token")
    async def token(form: OAuth2PasswordRequestForm = Depends()) -> dict[str, Any]:
        issued = auth.issue(form.username, form.password)
        if issued is None:
            await asyncio.sleep(0.5)  # slows guessing; the secret is long anyway
            raise HTTPException(401, "wrong username or password", headers={"WWW-Authenticate": "Bearer"})
        return {"access_token": issued, "token_type": "Bearer"}

    @router.get("/token/valid")
    def valid() -> dict[str, Any]:
        return {"valid": True}  # the Guard has already refused invalid tokens

    return router


# -- the ASGI guard ------------------------------------------------------------------------------------------------


def _is_loopback(host: str) -> bool:
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return host == "localhost"


def _hostname(value: str) -> str:
    """``host:port`` / ``[::1]:port`` -> host."""
    if value.startswith("["):
        return value[1 : value.find("]")] if "]" in value else value
    return value.rsplit(":", 1)[0] if value.count(":") == 1 else value


class Guard:
    """Outermost ASGI layer: refuses what must never reach MONAI Label's routes, and keeps error bodies clean."""

    def __init__(self, inner: ASGIApp, config: AppConfig, auth: TokenAuth | None) -> None:
        self.inner = inner
        self.upload_timeout_s: float = config.upload_timeout_s
        self.auth = auth
        self.extra_origins = {o.rstrip("/") for o in config.cors_origins}
        self.extra_hosts = {_hostname(o.split("://", 1)[-1].rstrip("/")) for o in config.cors_origins}
        self.logs = config.logs_endpoint
        self.max_body = (config.max_upload_mb << 20) + _MULTIPART_SLACK

    def _origins(self, scope: Scope) -> set[str]:
        """The server's own loopback origins (its port, http and https) plus the configured ones."""
        host, port = scope.get("server") or ("127.0.0.1", 0)
        names = {*LOOPBACK_HOSTS, host}
        own = {f"{scheme}://{f'[{n}]' if ':' in n else n}:{port}" for n in names for scheme in ("http", "https")}
        return own | self.extra_origins

    def check(self, scope: Scope) -> tuple[int, str] | None:
        """(status, message) for a refused request, or None."""
        headers = Headers(scope=scope)
        method, path = scope["method"], scope["path"]
        server_host = (scope.get("server") or ("127.0.0.1", 0))[0]
        host = _hostname(headers.get("host", ""))
        if host and not (_is_loopback(host) or host == server_host or host in self.extra_hosts):
            return 403, f"Host {host[:80]!r} is not served here (add it with --conf cors_origins)"
        origin = headers.get("origin")
        if origin is not None and origin.rstrip("/") not in self._origins(scope):
            return 403, f"origin {origin[:80]!r} is not allowed (--conf cors_origins)"
        if path.startswith(BLOCKED_PREFIXES) or (path.startswith(LOG_PREFIX) and not self.logs):
            return 404, "Not Found"
        client = (scope.get("client") or ("",))[0]
        authenticated = self.auth is not None or settings.MONAI_LABEL_AUTH_ENABLE
        if not _is_loopback(client) and not authenticated:
            return 403, "only loopback clients are served unless authentication is on (docs/security.md)"
        ohif = settings.MONAI_LABEL_API_STR + OHIF_PREFIX
        ohif_file = method in ("GET", "HEAD") and (path == ohif or path.startswith(ohif + "/"))
        open_path = (method, path) in OPEN_PATHS or method == "OPTIONS" or ohif_file
        if self.auth is not None and not open_path and self.auth.user(headers.get("authorization")) is None:
            return 401, "authentication required: POST /auth/token, then send Authorization: Bearer <token>"
        if method in ("POST", "PUT", "PATCH"):
            if "chunked" in headers.get("transfer-encoding", "").lower():
                return 411, "send a Content-Length (chunked uploads are not accepted)"
            length = headers.get("content-length", "0")
            if not length.isdigit():
                return 400, "invalid Content-Length"
            if int(length) > self.max_body:
                return 413, f"request body larger than {self.max_body} bytes (--conf max_upload_mb)"
        return None

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.inner(scope, receive, send)
            return
        refused = self.check(scope)
        if refused is not None:
            await _send_json(send, refused[0], {"detail": refused[1]})
            return
        if scope["method"] not in ("POST", "PUT", "PATCH"):
            await self.inner(scope, receive, _CleanErrors(send))
            return
        body = _BodyDeadline(receive, self.upload_timeout_s)
        try:
            await self.inner(scope, body, _CleanErrors(send, body))
        except Exception:
            if not body.expired:
                raise
            # the route gave up on the body it was reading (ClientDisconnect); the 408 has been sent
        if body.expired:
            what = f"{scope['method']} {scope['path'][:80]}"
            logger.warning("%s: request body not received within %g s (--conf upload_timeout_s)", what, body.seconds)


class _BodyDeadline:
    """``receive`` for one request with a body: the whole body must arrive within ``seconds`` of the request's
    start, or the route sees the client disconnect (and :class:`_CleanErrors` answers 408). A slow-loris upload
    therefore holds no worker past the limit. Once the body is complete, ``receive`` is passed through untimed
    (Starlette listens on it for disconnects while a response streams)."""

    def __init__(self, receive: Receive, seconds: float) -> None:
        self.receive = receive
        self.seconds = seconds
        self.deadline = time.monotonic() + seconds
        self.complete = False
        self.expired = False

    async def __call__(self) -> Message:
        if self.complete:
            return await self.receive()
        if self.expired:
            return {"type": "http.disconnect"}
        try:
            message = await asyncio.wait_for(self.receive(), max(0.0, self.deadline - time.monotonic()))
        except TimeoutError:
            self.expired = True
            return {"type": "http.disconnect"}
        if message["type"] != "http.request" or not message.get("more_body", False):
            self.complete = True
        return message


async def _send_json(send: Send, status: int, body: dict[str, Any]) -> None:
    data = json.dumps(body).encode()
    headers = [(b"content-type", b"application/json"), (b"content-length", str(len(data)).encode())]
    if status == 401:
        headers.append((b"www-authenticate", b"Bearer"))
    await send({"type": "http.response.start", "status": status, "headers": headers})
    await send({"type": "http.response.body", "body": data})


class _CleanErrors:
    """``send`` for one response: a 4xx body (and a deliberate 502 / 503 / 504) loses server paths, a 500 body
    becomes one generic line (the log keeps the traceback)."""

    def __init__(self, send: Send, body: _BodyDeadline | None = None) -> None:
        self.send = send
        self.request_body = body
        self.start: Message | None = None
        self.body = b""

    async def __call__(self, message: Message) -> None:
        if message["type"] == "http.response.start":
            if message["status"] < 400 and not self.expired:
                await self.send(message)
            else:
                self.start = message
            return
        if self.start is None or message["type"] != "http.response.body":
            await self.send(message)
            return
        self.body += message.get("body", b"")[:_ERROR_BODY_MAX]
        if message.get("more_body"):
            return
        status = self.start["status"]
        if self.expired:
            status = 408
            seconds = self.request_body.seconds if self.request_body else 0
            data = {"detail": f"the request body did not arrive within {seconds:g} s (--conf upload_timeout_s)"}
        elif status == 500:
            data = {"detail": "internal server error; the server log has the details"}
        else:
            try:
                data = json.loads(self.body)
            except ValueError:
                data = {"detail": self.body.decode("utf-8", "replace")}
            data = json.loads(scrub(json.dumps(data)))
        body = json.dumps(data).encode()
        headers = [(k, v) for k, v in self.start["headers"] if k.lower() not in (b"content-length", b"content-type")]
        headers += [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
        if status == 408:
            headers.append((b"connection", b"close"))
        await self.send({**self.start, "status": status, "headers": headers})
        await self.send({"type": "http.response.body", "body": body})

    @property
    def expired(self) -> bool:
        return self.request_body is not None and self.request_body.expired


# -- the inference deadline ---------------------------------------------------------------------------------------

# the wall-clock deadline (time.monotonic) of the inference request this thread is working for; None elsewhere
_DEADLINE: contextvars.ContextVar[float | None] = contextvars.ContextVar("evlf_infer_deadline", default=None)


class InferTimeout(Exception):
    """Raised inside the model's worker once its request's deadline has passed."""


def _deadline_checked(generate: Callable[..., Any]) -> Callable[..., Any]:
    """The backend's ``generate``, refusing to start a batch after its request's deadline.

    Python cannot stop a thread, so the deadline is cooperative: the pipeline calls ``generate`` once per batch
    of slices, so an over-time request stops within one batch and releases the model lock."""

    @functools.wraps(generate)
    def checked(*args: Any, **kwargs: Any) -> Any:
        deadline = _DEADLINE.get()
        if deadline is not None and time.monotonic() > deadline:
            raise InferTimeout
        return generate(*args, **kwargs)

    return checked


def _discard(future: Future) -> None:
    """A result nobody waits for any more: remove its result file (``send_response`` would have)."""
    if future.cancelled() or future.exception() is not None:
        return
    path = (future.result() or {}).get("file")
    if path and os.path.isfile(path):
        os.remove(path)


class InferRunner:
    """Runs each inference in a worker thread and answers 504 at the request's deadline (``infer_timeout_s``).

    The worker owns the request's clean-ups (upload folder, queue slot) and runs them when it ends, so an
    abandoned request keeps its place in the queue bound until the model has actually let go of it."""

    def __init__(self, instance: MONAILabelApp, timeout_s: int, workers: int) -> None:
        self.instance = instance
        self.timeout_s = timeout_s
        self.pool = ThreadPoolExecutor(max_workers=workers, thread_name_prefix="evlf-infer")

    def _work(self, request: dict[str, Any], cleanup: ExitStack) -> dict[str, Any]:
        with cleanup:
            return self.instance.infer(request)

    def run(self, request: dict[str, Any], cleanup: ExitStack) -> dict[str, Any]:
        deadline = time.monotonic() + self.timeout_s
        context = contextvars.copy_context()
        context.run(_DEADLINE.set, deadline)
        future = self.pool.submit(context.run, self._work, request, cleanup)
        try:
            return future.result(timeout=max(0.0, deadline - time.monotonic()))
        except (FutureTimeout, InferTimeout):
            future.add_done_callback(_discard)
            logger.warning("%s request stopped after %d s (--conf infer_timeout_s)", request["model"], self.timeout_s)
            raise refuse(
                504,
                f"inference took longer than {self.timeout_s} s (--conf infer_timeout_s) and was stopped; "
                "retry with fewer slices, or ask the administrator to raise the limit",
            ) from None


# -- routes in front of MONAI Label's ------------------------------------------------------------------------------

# request keys MONAI Label acts on server-side: never from a client
_SERVER_KEYS = {"bundle_path", "image", "model", "description", "session", "file", "label", "device", "logging"}


def check_can_train(trainer: Any) -> None:
    """A trainer that can tell up front it cannot run here (EVLFTrainTask over a remote backend) answers its 4xx
    in the route, before MONAI Label starts a training child and answers 200."""
    check = getattr(trainer, "check_can_train", None)
    if check is not None:
        check()


def _client_params(params: dict[str, Any], what: str) -> dict[str, Any]:
    for key in params:
        if key in _SERVER_KEYS or key.startswith("_"):
            raise refuse(422, f"{what}: the parameter {key!r} cannot be set by a client")
    return params


def _proxy_path(path: str) -> tuple[str, str]:
    """MONAI Label's proxy operation (``wado``, ``qido``, ``stow`` or ``""``) and the path after it; 422 for dot
    segments, which the HTTP client would resolve into the DICOMweb server's other endpoints."""
    segments = path.split("/")
    if any(s in (".", "..") or "\\" in s for s in segments):
        raise refuse(422, "invalid DICOMweb path: no '.' or '..' segments")
    if segments[0] in ("wado", "qido", "stow"):
        return segments[0], "/".join(segments[1:])
    return "", path


def _public_lines(lines: Any) -> list[str]:
    """A training / scoring child's last output lines as a client may see them: traceback frames dropped (the
    server log keeps them), server paths scrubbed; the exception's own line stays, it says what went wrong."""
    shown: list[str] = []
    in_traceback = False
    for line in map(str, lines or ()):
        if line.startswith("Traceback (most recent call last)"):
            in_traceback = True
            shown.append("Traceback omitted (the server log has it)")
            continue
        if in_traceback and line.startswith((" ", "\t")):
            continue
        in_traceback = False
        shown.append(scrub(line))
    return shown


def _public_status(status: Any) -> Any:
    """MONAI Label's train / scoring status (one task or a list) with :func:`_public_lines` details."""
    if isinstance(status, list):
        return [_public_status(task) for task in status]
    if isinstance(status, dict) and "details" in status:
        return {**status, "details": _public_lines(status["details"])}
    return status


def _move_to_front(app: FastAPI, router: APIRouter) -> None:
    before = len(app.router.routes)
    app.include_router(router, prefix=settings.MONAI_LABEL_API_STR)
    added = app.router.routes[before:]
    del app.router.routes[before:]
    app.router.routes[0:0] = added


def _save_upload(upload: UploadFile, folder: Path, suffix: str, limit: int) -> Path:
    path = folder / f"upload{suffix}"
    copy_limited(upload.file, path, limit)
    return path


def guarded_router(instance: MONAILabelApp, config: AppConfig) -> APIRouter:
    """Routes with MONAI Label's paths and parameters that validate first and then do MONAI Label's work.

    They are plain ``def`` so FastAPI runs them in its thread pool: inference never blocks ``/info/``."""
    limits = config.limits
    router = APIRouter()
    user_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_USER)
    annotator_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ANNOTATOR)
    admin_role = RBAC(settings.MONAI_LABEL_AUTH_ROLE_ADMIN)
    queue = threading.BoundedSemaphore(config.max_queued_requests)
    runner = InferRunner(instance, config.infer_timeout_s, config.max_queued_requests)

    @router.post("/infer/{model}")
    def infer(
        background_tasks: BackgroundTasks,
        model: str,
        image: str = "",
        session_id: str = "",
        params: str = Form("{}"),
        file: UploadFile = File(None),
        label: UploadFile = File(None),
        output: ml_infer.ResultType | None = None,
        user: User = Depends(user_role),
    ):
        if model not in instance._infers:
            raise refuse(404, f"unknown model {model[:80]!r}; available: {', '.join(sorted(instance._infers))}")
        request: dict[str, Any] = {"model": model}
        request.update(_client_params(parse_json_object(params, "params", limits), "params"))
        if label is not None or session_id:
            raise refuse(422, "this server takes an image id or an uploaded volume file (no label, no session)")
        if output == ml_infer.ResultType.dicom_seg:
            raise refuse(422, "output=dicom_seg: use the params {'output': 'dicom_seg'} of evlf_grounding")
        if not queue.acquire(blocking=False):
            raise refuse(429, "the model is busy with other requests; retry shortly")
        with ExitStack() as cleanup:  # handed to the worker once the request is valid
            cleanup.callback(queue.release)
            folder = cleanup.enter_context(upload_dir())
            if file is not None:
                path = _save_upload(file, folder, volume_suffix(file.filename or ""), limits.max_upload_bytes)
                check_volume_file(path, limits)
                request.update(image=str(path), _upload=True)
            elif image:
                request["image"] = check_id(image)
            else:
                raise refuse(422, "no image: give an image id or upload a file")
            work = cleanup.pop_all()
        result = runner.run(request, work)
        return ml_infer.send_response(instance.datastore(), result, output, background_tasks)

    def add_image(image: str | None, params: str, file: UploadFile) -> dict[str, Any]:
        suffix = volume_suffix(file.filename or "")
        image_id = check_id(image or (file.filename or "")[: -len(suffix)])  # a file name with a path is refused
        info = parse_json_object(params, "params", limits)
        with upload_dir() as folder:
            path = _save_upload(file, folder, suffix, limits.max_upload_bytes)
            return {"image": instance.datastore().add_image(image_id, str(path), info)}

    @router.put("/datastore/image")
    def put_image(
        image: str | None = None,
        params: str = Form("{}"),
        file: UploadFile = File(...),
        user: User = Depends(annotator_role),
    ):
        return add_image(image, params, file)

    @router.put("/datastore/", include_in_schema=False)
    def put_image_legacy(
        image: str | None = None,
        params: str = Form("{}"),
        file: UploadFile = File(...),
        user: User = Depends(annotator_role),
    ):
        return add_image(image, params, file)

    @router.put("/datastore/label")
    def put_label(
        image: str,
        params: str = Form("{}"),
        tag: str = "final",
        label: UploadFile = File(...),
        user: User = Depends(annotator_role),
    ):
        check_id(image)
        tag = check_tag(tag or "final")
        info = parse_json_object(params, "params", limits)
        suffix = label_suffix(label.filename or "")
        with upload_dir() as folder:
            path = _save_upload(label, folder, suffix, limits.max_upload_bytes)
            label_id = instance.datastore().save_label(image, str(path), tag, info)
        return {**(instance.on_save_label(image, label_id) or {}), "image": image, "label": label_id}

    @router.put("/datastore/image/info")
    def put_image_info(image: str, info: str = Form("{}"), user: User = Depends(annotator_role)):
        instance.datastore().update_image_info(check_id(image), parse_json_object(info, "info", limits))
        return {}

    @router.put("/datastore/label/info")
    def put_label_info(label: str, tag: str, info: str = Form("{}"), user: User = Depends(annotator_role)):
        instance.datastore().update_label_info(check_id(label), check_tag(tag), parse_json_object(info, "info", limits))
        return {}

    @router.put("/datastore/updatelabelinfo", include_in_schema=False)
    def put_label_info_legacy(label: str, tag: str, params: str = Form("{}"), user: User = Depends(annotator_role)):
        return put_label_info(label, tag, params, user)

    @router.post("/train/{model}")
    def train(
        model: str,
        params: dict | None = None,
        run_sync: bool | None = False,
        enqueue: bool | None = False,
        user: User = Depends(admin_role),
    ):
        if model not in instance._trainers:
            raise refuse(404, f"unknown trainer {model[:80]!r}; available: {', '.join(sorted(instance._trainers))}")
        check_can_train(instance._trainers[model])
        params = check_train_params(check_json_object(params or {}, "params", limits), config, limits)
        return ml_train.run_model(model, params, False, enqueue)

    @router.post("/train/", include_in_schema=False)
    def train_all(params: dict | None = None, run_sync: bool | None = False, user: User = Depends(admin_role)):
        params = check_json_object(params or {}, "params", limits)
        for model in instance._trainers:
            check_can_train(instance._trainers[model])
            check_train_params(check_json_object(params.get(model, {}), model, limits), config, limits)
        unknown = sorted(set(params) - set(instance._trainers))
        if unknown:
            raise refuse(422, f"params are keyed by trainer name; unknown: {', '.join(map(repr, unknown))}")
        return {m: ml_train.run_model(m, params.get(m, {}), False, True) for m in instance._trainers}

    @router.get("/train/")
    def train_status(all: bool = False, check_if_running: bool = False, user: User = Depends(user_role)):
        """MONAI Label's status; its ``details`` are the child's output lines, tracebacks and paths included."""
        return _public_status(ml_train.status(all, check_if_running))

    @router.get("/scoring/")
    def scoring_status(all: bool = False, check_if_running: bool = False, user: User = Depends(user_role)):
        return _public_status(ml_scoring.status(all, check_if_running))

    def check_scoring(method: str, params: dict | None) -> dict[str, Any]:
        if method not in instance._scoring_methods:
            names = ", ".join(sorted(instance._scoring_methods))
            raise refuse(404, f"unknown scoring method {method[:80]!r}; available: {names}")
        params = check_json_object(params or {}, "params", limits)
        unknown = sorted(set(params) - {"label_tag", "client_id"})
        if unknown:
            raise refuse(422, f"unknown scoring parameter(s) {', '.join(map(repr, unknown))}; use label_tag, client_id")
        if "label_tag" in params:
            check_tag(params["label_tag"])
        return params

    @router.post("/scoring/{method}")
    def scoring(
        method: str, params: dict | None = None, run_sync: bool | None = False, user: User = Depends(annotator_role)
    ):
        return ml_scoring.run_method(method, check_scoring(method, params), False)

    @router.post("/scoring/", include_in_schema=False)
    def scoring_all(params: dict | None = None, run_sync: bool | None = False, user: User = Depends(annotator_role)):
        checked = {m: check_scoring(m, (params or {}).get(m)) for m in instance._scoring_methods}
        return {m: ml_scoring.run_method(m, p, False) for m, p in checked.items()}

    @router.post("/activelearning/{strategy}")
    def activelearning(strategy: str, params: dict | None = None, user: User = Depends(user_role)):
        if strategy not in instance._strategies:
            names = ", ".join(sorted(instance._strategies))
            raise refuse(404, f"unknown strategy {strategy[:80]!r}; available: {names}")
        params = check_json_object(params or {}, "params", limits)
        unknown = sorted(set(params) - {"label_tag", "labels", "client_id"})
        if unknown:
            raise refuse(422, f"unknown parameter(s) {', '.join(map(repr, unknown))}; use label_tag, labels, client_id")
        if "label_tag" in params:
            check_tag(params["label_tag"])
        labels = params.get("labels")
        if labels is not None and not (isinstance(labels, list) and all(isinstance(x, str) for x in labels)):
            raise refuse(422, "'labels' must be a list of strings")
        if not isinstance(params.get("client_id") or "", str):
            raise refuse(422, "'client_id' must be a string")
        return ml_activelearning.sample(strategy, params, user.username)

    def dicomweb() -> EVLFDICOMwebDatastore:
        datastore = instance.datastore()
        if not isinstance(datastore, EVLFDICOMwebDatastore):
            raise refuse(404, "no DICOMweb server behind this one: its studies are a local folder")
        return datastore

    @router.get("/proxy/dicom/{path:path}", include_in_schema=False)
    async def proxy_read(request: Request, path: str, user: User = Depends(user_role)):
        """QIDO-RS / WADO-RS reads, passed to MONAI Label's proxy once the path is checked."""
        dicomweb()
        operation, rest = _proxy_path(path)
        try:
            return await ml_proxy.proxy_dicom(request, operation, rest)
        except requests.RequestException:
            raise refuse(502, "the DICOMweb server did not answer") from None

    def store(datastore: EVLFDICOMwebDatastore, content_type: str, body: bytes, study_uid: str | None) -> Any:
        """Check every instance of a STOW-RS body as a correction, then store them all, or none."""
        datasets = read_stow_body(body, stow_boundary(content_type), study_uid)
        checked = []
        with upload_dir() as folder:
            for n, dataset in enumerate(datasets, 1):
                path = folder / f"part{n}.dcm"
                try:
                    dataset.save_as(path, write_like_original=False)
                    image_id, correction = datastore.check_correction(str(path))
                except HTTPException as exc:
                    raise refuse(exc.status_code, f"part {n}: {exc.detail}") from None
                except requests.RequestException:
                    raise refuse(502, "the DICOMweb server did not answer while the body was checked") from None
                except Exception as exc:  # pydicom / highdicom / numpy raise many error types on crafted objects
                    logger.warning("STOW-RS part %d refused: %s", n, exc, exc_info=True)
                    raise refuse(422, f"part {n} cannot be read as a correction ({type(exc).__name__})") from None
                logger.info("STOW-RS part %d: a %s correcting series %s", n, correction.Modality, image_id)
                checked.append(correction)
        try:
            answer = datastore.store_corrections(checked)
        except requests.RequestException as exc:
            status = getattr(exc.response, "status_code", None)
            raise refuse(502, f"the DICOMweb server did not store the objects (HTTP {status or 'no answer'})") from None
        return answer.to_json_dict()

    @router.post("/proxy/dicom/{path:path}", include_in_schema=False)
    async def proxy_store(request: Request, path: str, user: User = Depends(annotator_role)):
        """STOW-RS only, and only corrections training can use (docs/security.md); MONAI Label's proxy would pass
        any body on to the DICOMweb server. OHIF without a ``stowRoot`` (MONAI Label's build) stores at
        ``{wadoRoot}/studies``, so every ``[wado|qido|stow/]studies[/{study}]`` is a STOW-RS request here, and
        the objects go to the datastore's STOW-RS URL."""
        datastore = dicomweb()
        _, rest = _proxy_path(path)
        parts = rest.split("/")
        if parts[0] != "studies" or len(parts) > 2:
            raise refuse(404, "only STOW-RS is accepted here: POST to proxy/dicom/stow/studies[/StudyInstanceUID]")
        study_uid = check_uid(parts[1], "StudyInstanceUID") if len(parts) == 2 else None
        content_type = request.headers.get("content-type", "")
        stow_boundary(content_type)  # 415 before the body is read
        body = await request.body()
        answer = await run_in_threadpool(store, datastore, content_type, body, study_uid)
        return JSONResponse(answer, media_type="application/dicom+json")

    @router.put("/session/")
    def session(user: User = Depends(user_role)):
        raise refuse(422, "sessions are not offered by this server: upload the volume with POST /infer/<model>")

    @router.get("/session/{session_id}")
    @router.delete("/session/{session_id}")
    def session_by_id(session_id: str, user: User = Depends(user_role)):
        raise refuse(404, "sessions are not offered by this server: upload the volume with POST /infer/<model>")

    @router.get("/datastore/dataset")
    def dataset(limit_cases: int | None = None, user: User = Depends(annotator_role)):
        """MONAI Label's ZIP of the labelled studies, removed once sent (MONAI Label left each one in the temp
        folder, and answered 500 when no study had a label)."""
        if limit_cases is not None and limit_cases < 1:
            raise refuse(422, "'limit_cases' must be a positive integer")
        datastore = instance.datastore()
        if isinstance(datastore, EVLFDICOMwebDatastore) or not datastore.datalist():
            raise refuse(404, "no labelled study to archive (DICOMweb studies: use the PACS)")
        path = datastore.get_dataset_archive(limit_cases)
        return FileResponse(path, filename="dataset.zip", background=BackgroundTask(os.remove, path))

    return router


def warm_imaging() -> None:
    """Read a tiny NIfTI once, so ITK's first import (seconds of C++ module loading that holds the GIL, so
    no other thread, not even the one answering 504 at ``infer_timeout_s``, runs meanwhile) happens before
    the server answers, not inside the first request's deadline."""
    started = time.monotonic()
    with tempfile.TemporaryDirectory(prefix="evlf-warm-") as folder:
        path = Path(folder) / "warm.nii.gz"
        nib.save(nib.Nifti1Image(np.zeros((2, 2, 2), np.int16), np.eye(4)), str(path))
        load_volume(path)
    logger.info("imaging warmed up in %.1f s (ITK loaded before the first request)", time.monotonic() - started)


def install(instance: MONAILabelApp, config: AppConfig) -> None:
    """Guard the running MONAI Label server, if this process is one (the train child and tests are not)."""
    web = sys.modules.get("monailabel.app")
    if web is None or getattr(web.app.state, "evlf_guarded", False):
        return
    removed = remove_stale_uploads()
    if removed:
        logger.warning("removed %d upload folder(s) left by a server that was killed mid-upload", removed)
    warm_imaging()
    app: FastAPI = web.app
    auth = load_auth(config)
    served = getattr(instance, "served", None)
    if served is not None:  # this process's model: infer requests past infer_timeout_s stop at the next batch
        served.backend.generate = _deadline_checked(served.backend.generate)
    if auth is not None:
        _move_to_front(app, auth_router(auth))
    _move_to_front(app, guarded_router(instance, config))
    _move_to_front(app, ohif_router())  # OHIF files served right, EVLF SR text shown (app/ohif.py)
    stack = app.middleware_stack or app.build_middleware_stack()
    app.middleware_stack = Guard(stack, config, auth)
    app.state.evlf_guarded = True
    mode = "token" if auth else "MONAI Label" if settings.MONAI_LABEL_AUTH_ENABLE else "off"
    logger.info("EVLF guard installed (auth: %s)", mode)
