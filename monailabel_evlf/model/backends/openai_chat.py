"""A model behind an OpenAI-compatible ``/v1/chat/completions`` server (vLLM, SGLang, TGI, ``transformers serve``).

Several MONAI Label servers can then share one GPU model server and scale independently of it. Each slice goes out
as one request (a base64 PNG ``image_url`` part, then the prompt as a text part, the order the local backends use),
at most ``max_concurrency`` at a time; the server batches concurrent requests itself (continuous batching), which
the chat API's one-conversation-per-request shape leaves to it.

Boxes: the served model writes them the way its local backend family does, so :attr:`box_codec` is that family's
own codec (``family``, default ``qwen2_5_vl``: pixels after Qwen2.5-VL's ``smart_resize``, worked out with the
served model's processor config, loaded locally from ``processor``). Prompts, parsing and rewards then read remote
answers with the same code as local ones.

Confidence: where the server returns log-probs (vLLM, SGLang: ``logprobs: true``), :meth:`completion_logprobs`
hands back those of the answers it generated, so the pipeline's per-answer confidence (geometric-mean token
probability) works as for a local model, over the tokens the server reports. Servers that ignore ``logprobs``
(``transformers serve``) give none: answers then carry ``confidence: null`` and boxes the detection score alone,
as documented for backends that cannot score (docs/scale.md).

Failures: connection errors, timeouts and 408/429/5xx answers are retried with exponential backoff; when the
attempts are spent, or the server refuses the request, :class:`~monailabel_evlf.errors.BackendUnavailable`
names the server and the reason and the app answers 503. Every request has a connect and a read timeout, so a
dead server costs at most ``(retries + 1) x timeout_s`` plus the backoff, never a hang. Training stays local:
serve an adapter trained here with vLLM's LoRA support (docs/scale.md).
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import io
import logging
import os
import threading
import time
from collections import OrderedDict
from collections.abc import Callable, Iterator, Sequence
from concurrent.futures import FIRST_EXCEPTION, Future, ThreadPoolExecutor, wait
from contextlib import AbstractContextManager
from dataclasses import dataclass
from pathlib import Path
from typing import Any, ClassVar

import numpy as np
import requests
import torch
from PIL import Image

from monailabel_evlf.errors import BackendUnavailable
from monailabel_evlf.model.backend import CompletionLogprobs, SamplingConfig, resolve_backend_class
from monailabel_evlf.parsing import parse_bool
from monailabel_evlf.tasks.box_codec import BoxCodec

logger = logging.getLogger(__name__)

RETRIED_STATUS = frozenset({408, 429, 500, 502, 503, 504})
TRAINING_STAYS_LOCAL = (
    "the openai_chat backend only generates: train with a local backend (e.g. --backend qwen2_5_vl) and serve the "
    "adapter with vLLM --enable-lora --lora-modules NAME=DIR, then --conf model NAME (docs/scale.md)"
)


def _positive(kind: type) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        number = kind(value)
        if number <= 0:
            raise ValueError("must be > 0")
        return number

    return parse


def _non_negative(kind: type) -> Callable[[Any], Any]:
    def parse(value: Any) -> Any:
        number = kind(value)
        if number < 0:
            raise ValueError("must be >= 0")
        return number

    return parse


def _url(value: Any) -> str:
    text = str(value).strip().rstrip("/")
    if not text.startswith(("http://", "https://")):
        raise ValueError("must be an http:// or https:// URL of the API root, e.g. http://gpu-host:8000/v1")
    return text


@dataclass(frozen=True)
class ServerOptions:
    """``--conf backend.<key>`` options; see docs/scale.md. ``url`` is the API root (where ``/chat/completions`` is)."""

    url: str
    family: str = "qwen2_5_vl"  # local backend whose box convention the served model writes
    processor: str | None = None  # where its processor config is (default: the model name, if it is a local dir)
    max_concurrency: int = 8  # requests in flight per backend (the pool that bounds one batch)
    timeout_s: float = 60.0  # read timeout per request
    connect_timeout_s: float = 5.0
    retries: int = 2  # extra attempts after a connection error, a timeout or a 408/429/5xx answer
    backoff_s: float = 0.5  # first wait between attempts; doubled each time
    logprobs: bool = True  # ask for token log-probs (confidence); servers that cannot just ignore the field
    api_key_env: str = "OPENAI_API_KEY"  # environment variable with a bearer token (never a --conf value)
    system_prompt: str | None = None
    local_files_only: bool = True  # for loading the processor config


OPTION_PARSERS: dict[str, Callable[[Any], Any]] = {
    "url": _url,
    "family": str,
    "processor": str,
    "max_concurrency": _positive(int),
    "timeout_s": _positive(float),
    "connect_timeout_s": _positive(float),
    "retries": _non_negative(int),
    "backoff_s": _non_negative(float),
    "logprobs": lambda v: parse_bool(v, "backend.logprobs"),
    "api_key_env": str,
    "system_prompt": str,
    "local_files_only": lambda v: parse_bool(v, "backend.local_files_only"),
}


def parse_server_options(options: dict[str, Any]) -> ServerOptions:
    """Strings from ``--conf backend.<key>`` (or typed values) -> :class:`ServerOptions`; errors name the key."""
    unknown = sorted(set(options) - set(OPTION_PARSERS))
    if unknown:
        raise ValueError(f"unknown openai_chat backend option(s) {unknown}; known: {sorted(OPTION_PARSERS)}")
    if "url" not in options:
        raise ValueError("the openai_chat backend needs --conf backend.url http://HOST:PORT/v1 (the server's API root)")
    parsed = {}
    for key, value in options.items():
        try:
            parsed[key] = OPTION_PARSERS[key](value)
        except (TypeError, ValueError) as exc:
            raise ValueError(f"backend option {key}={value!r}: {exc}") from exc
    return ServerOptions(**parsed)


def family_box_codec(family: str, load_processor: Callable[[], Any]) -> BoxCodec:
    """The box codec the local backend ``family`` hands out, for the served model's processor.

    A family whose codec is a class attribute needs nothing; one whose codec is a property of its processor
    (Qwen2.5-VL's resize) gets it evaluated by the family's own code on an instance that holds only the processor,
    so the resize rule is never re-implemented here (and no weights are loaded)."""
    cls = resolve_backend_class(family)
    codec = inspect.getattr_static(cls, "box_codec", None)
    if isinstance(codec, BoxCodec):
        return codec
    if not isinstance(codec, property):
        raise ValueError(f"backend family {family!r} has no box_codec to interpret the served model's boxes")
    holder = cls.__new__(cls)
    holder.processor = load_processor()
    try:
        return holder.box_codec
    except AttributeError as exc:
        raise ValueError(f"backend family {family!r}: its box_codec needs more than the processor ({exc})") from exc


def png_data_url(image: np.ndarray) -> str:
    """An RGB uint8 ``(H, W, 3)`` slice as a lossless PNG ``data:`` URL (what chat servers take as image_url)."""
    array = np.asarray(image)
    if array.dtype != np.uint8 or array.ndim != 3 or array.shape[-1] != 3:
        raise ValueError(f"expected an RGB uint8 (H, W, 3) image, got {array.dtype} {array.shape}")
    buffer = io.BytesIO()
    Image.fromarray(array).save(buffer, format="PNG")
    return "data:image/png;base64," + base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass(frozen=True)
class Choice:
    text: str
    logprobs: tuple[float, ...] | None


class OpenAIChatBackend:
    """:class:`~monailabel_evlf.model.backend.VLMBackend` over HTTP; ``model_id`` is the name the server serves."""

    # why this backend cannot be fine-tuned here: the app's train route answers 409 with it before a training child
    # starts (backends without the attribute train)
    cannot_train: ClassVar[str] = TRAINING_STAYS_LOCAL

    def __init__(self, served_model: str, options: ServerOptions, box_codec: BoxCodec) -> None:
        self.model_id = served_model
        self.options = options
        self.box_codec = box_codec
        self._endpoint = f"{options.url}/chat/completions"
        self._pool = ThreadPoolExecutor(max_workers=options.max_concurrency, thread_name_prefix="evlf-openai")
        self._sessions = threading.local()  # requests.Session is not documented thread-safe: one per worker
        self._scores: OrderedDict[tuple[str, str, str], tuple[float, ...]] = OrderedDict()
        self._scores_max = 4096

    @classmethod
    def from_pretrained(
        cls,
        name_or_path: str,
        *,
        device: str = "cpu",
        dtype: str = "float32",
        trust_remote_code: bool = False,
        adapter: str | Path | None = None,
        **options: Any,
    ) -> OpenAIChatBackend:
        """``name_or_path`` is the model name the server knows (for ``transformers serve``: the path it loaded; for
        vLLM: ``--served-model-name`` or a ``--lora-modules`` name). ``device`` / ``dtype`` are the server's business
        and ignored here; ``adapter`` is refused (adapters are served by the server, see docs/scale.md)."""
        if adapter is not None:
            raise ValueError(f"adapter {adapter}: {TRAINING_STAYS_LOCAL}")
        opts = parse_server_options(options)
        processor_source = opts.processor or name_or_path

        def load_processor() -> Any:
            from transformers import AutoProcessor  # lazy: a remote model needs no transformers

            load = {"trust_remote_code": trust_remote_code, "local_files_only": opts.local_files_only}
            try:
                return AutoProcessor.from_pretrained(processor_source, **load)
            except OSError as exc:
                raise ValueError(
                    f"cannot load the served model's processor from {processor_source!r} (needed for its box "
                    f"convention; set --conf backend.processor DIR_OR_HUB_ID): {exc}"
                ) from exc

        backend = cls(name_or_path, opts, family_box_codec(opts.family, load_processor))
        backend.probe()
        return backend

    # ----- HTTP -----------------------------------------------------------------------------------------------
    def _session(self) -> requests.Session:
        session = getattr(self._sessions, "session", None)
        if session is None:
            session = self._sessions.session = requests.Session()
            token = os.environ.get(self.options.api_key_env)
            if token:
                session.headers["Authorization"] = f"Bearer {token}"
        return session

    def probe(self) -> bool:
        """Whether the server answers at all now (any HTTP status counts); a warning, not an error, when it does
        not: the model server may start after this one, and requests answer 503 until it does."""
        try:
            self._session().get(f"{self.options.url}/models", timeout=self.options.connect_timeout_s)
        except requests.RequestException as exc:
            logger.warning(
                "inference server %s not reachable now (%s); requests answer 503 until it is", self.options.url, exc
            )
            return False
        return True

    def _post(self, body: dict[str, Any]) -> dict[str, Any]:
        """One chat completion with retries; :class:`BackendUnavailable` when the server cannot give one."""
        opts = self.options
        started = time.monotonic()
        reason = ""
        for attempt in range(opts.retries + 1):
            if attempt:
                time.sleep(opts.backoff_s * 2 ** (attempt - 1))
            try:
                response = self._session().post(
                    self._endpoint, json=body, timeout=(opts.connect_timeout_s, opts.timeout_s)
                )
            except requests.Timeout:
                reason = f"no answer within {opts.timeout_s:g} s"
                continue
            except requests.ConnectionError as exc:
                reason = f"cannot connect ({type(exc).__name__})"
                continue
            if response.status_code in RETRIED_STATUS:
                reason = f"HTTP {response.status_code} {_detail(response)}"
                continue
            if response.status_code != 200:
                raise self._unavailable(f"refused the request: HTTP {response.status_code} {_detail(response)}")
            try:
                return response.json()
            except ValueError:
                raise self._unavailable("answered with invalid JSON") from None
        elapsed = time.monotonic() - started
        raise self._unavailable(f"unavailable: {reason} ({opts.retries + 1} attempts in {elapsed:.1f} s)")

    def _unavailable(self, what: str) -> BackendUnavailable:
        """The error for the client names no host (the log does: the model server is this deployment's detail)."""
        logger.warning("inference server %s %s", self.options.url, what)
        return BackendUnavailable(f"inference server {what}")

    def _body(self, image_url: str, prompt: str, n: int, sampling: SamplingConfig, seed: int | None) -> dict[str, Any]:
        messages: list[dict[str, Any]] = []
        if self.options.system_prompt:
            messages.append({"role": "system", "content": self.options.system_prompt})
        content = [{"type": "image_url", "image_url": {"url": image_url}}, {"type": "text", "text": prompt}]
        messages.append({"role": "user", "content": content})
        body: dict[str, Any] = {"model": self.model_id, "messages": messages, "max_tokens": sampling.max_new_tokens}
        if sampling.do_sample:
            body.update(temperature=sampling.temperature, top_p=sampling.top_p, n=n)
        else:
            body["temperature"] = 0.0  # greedy on every OpenAI-compatible server
        if seed is not None:
            body["seed"] = seed
        if self.options.logprobs:
            body["logprobs"] = True
        return body

    def _choices(self, body: dict[str, Any]) -> list[Choice]:
        answer = self._post(body)
        choices = answer.get("choices") if isinstance(answer, dict) else None
        if not isinstance(choices, list) or not choices:
            raise self._unavailable("answered without choices")
        return [_choice(c) for c in choices]

    # ----- protocol -------------------------------------------------------------------------------------------
    def generate(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], n: int = 1, sampling: SamplingConfig | None = None
    ) -> list[list[str]]:
        """``n`` answers per (image, prompt) pair, one request per pair in flight at once (bounded by the pool).

        Sampled answers ask for ``n`` choices; a server that ignores ``n`` gets further requests for the rest. With
        a seed, request ``k`` of pair ``i`` uses ``seed + i * n + k`` so the answers are reproducible and differ."""
        sampling = sampling or SamplingConfig()
        if n < 1:
            raise ValueError(f"n must be >= 1, got {n}")
        if len(images) != len(prompts):
            raise ValueError(f"{len(images)} images for {len(prompts)} prompts")
        urls = [png_data_url(image) for image in images]
        wanted = n if sampling.do_sample else 1  # greedy answers are identical: decode once (as the local backends)
        got: list[list[Choice]] = [[] for _ in prompts]
        while pending := [i for i in range(len(prompts)) if len(got[i]) < wanted]:
            futures = {}
            for i in pending:
                seed = None if sampling.seed is None else sampling.seed + i * n + len(got[i])
                body = self._body(urls[i], prompts[i], wanted - len(got[i]), sampling, seed)
                futures[self._pool.submit(self._choices, body)] = i
            for future, i in self._gather(futures).items():
                got[i] += future.result()[: wanted - len(got[i])]
        for image, prompt, choices in zip(images, prompts, got, strict=True):
            for choice in choices:
                if choice.logprobs:
                    self._remember(image, prompt, choice)
        return [[c.text for c in choices] * (n // wanted) for choices in got]

    def _gather(self, futures: dict[Future, int]) -> dict[Future, int]:
        """Wait for a batch; on the first failure cancel what has not started and raise it (no half answers)."""
        done, not_done = wait(futures, return_when=FIRST_EXCEPTION)
        for future in done:
            if future.exception() is not None:
                for other in not_done:
                    other.cancel()
                raise future.exception()
        return futures

    def _key(self, image: np.ndarray, prompt: str, text: str) -> tuple[str, str, str]:
        array = np.ascontiguousarray(image)
        digest = hashlib.sha1(array.tobytes() + str(array.shape).encode()).hexdigest()
        return digest, prompt, text

    def _remember(self, image: np.ndarray, prompt: str, choice: Choice) -> None:
        key = self._key(image, prompt, choice.text)
        self._scores[key] = choice.logprobs
        self._scores.move_to_end(key)
        while len(self._scores) > self._scores_max:
            self._scores.popitem(last=False)

    def completion_logprobs(
        self, images: Sequence[np.ndarray], prompts: Sequence[str], completions: Sequence[str]
    ) -> CompletionLogprobs:
        """The server's log-probs of answers this backend generated (no gradients: for confidence, not training).

        ``NotImplementedError`` when the server gave none or a completion was not generated here; the pipeline
        then reports no confidence."""
        rows = [self._scores.get(self._key(i, p, c)) for i, p, c in zip(images, prompts, completions, strict=True)]
        if not rows or any(row is None for row in rows):
            raise NotImplementedError(
                f"the inference server returned no log-probs for these answers; {TRAINING_STAYS_LOCAL}"
            )
        length = max(len(row) for row in rows)
        logprobs = torch.zeros((len(rows), length))
        mask = torch.zeros((len(rows), length), dtype=torch.bool)
        for r, row in enumerate(rows):
            logprobs[r, : len(row)] = torch.tensor(row)
            mask[r, : len(row)] = True
        return CompletionLogprobs(logprobs=logprobs, mask=mask)

    def reference_policy(self) -> AbstractContextManager[None]:
        raise NotImplementedError(TRAINING_STAYS_LOCAL)

    def trainable_parameters(self) -> Iterator[torch.nn.Parameter]:
        raise NotImplementedError(TRAINING_STAYS_LOCAL)

    def save_adapter(self, directory: Path) -> None:
        raise NotImplementedError(TRAINING_STAYS_LOCAL)

    def load_adapter(self, directory: Path | None) -> None:
        """Only ``None`` (the served weights): which adapter is served is the inference server's choice."""
        if directory is not None:
            raise ValueError(f"adapter {directory}: {TRAINING_STAYS_LOCAL}")

    def train(self, mode: bool = True) -> OpenAIChatBackend:
        return self

    def eval(self) -> OpenAIChatBackend:
        return self


def _detail(response: requests.Response) -> str:
    """The server's error message, short (servers put it in ``detail``, ``error.message`` or the body)."""
    try:
        data = response.json()
    except ValueError:
        return response.text.strip()[:200]
    if isinstance(data, dict):
        error = data.get("error")
        message = data.get("detail") or (error.get("message") if isinstance(error, dict) else error)
        if message:
            return str(message)[:200]
    return str(data)[:200]


def _choice(choice: Any) -> Choice:
    """One OpenAI choice -> text and, where given, per-token log-probs (``logprobs.content[*].logprob``)."""
    message = choice.get("message") if isinstance(choice, dict) else None
    text = message.get("content") if isinstance(message, dict) else None
    logprobs = None
    content = (choice.get("logprobs") or {}).get("content") if isinstance(choice, dict) else None
    if isinstance(content, list) and content:
        values = [item.get("logprob") for item in content if isinstance(item, dict)]
        if values and all(isinstance(v, int | float) for v in values):
            logprobs = tuple(float(v) for v in values)
    return Choice(text=text if isinstance(text, str) else "", logprobs=logprobs)
