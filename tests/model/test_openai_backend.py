"""The openai_chat backend against a real OpenAI-compatible server (``transformers serve`` on loopback, serving the
tiny Qwen2.5-VL), a scripted one where a real server cannot be made to misbehave on cue, and no server at all."""

from __future__ import annotations

import importlib.util
import json
import math
import os
import shutil
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Callable, Iterator
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np
import pytest
import requests

from monailabel_evlf.data.phantoms import make_phantom
from monailabel_evlf.errors import BackendUnavailable
from monailabel_evlf.imaging.volume import Volume
from monailabel_evlf.inference import PipelineConfig, VolumePipeline
from monailabel_evlf.model import load_backend
from monailabel_evlf.model.backend import BACKENDS, SamplingConfig, VLMBackend
from monailabel_evlf.model.backends.openai_chat import OpenAIChatBackend, parse_server_options
from monailabel_evlf.tasks.box_codec import BoxConvention

PROMPTS = ["Where is the lesion?", "What is the most likely diagnosis? Answer briefly."]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _images(count: int) -> list[np.ndarray]:
    rng = np.random.default_rng(0)
    sizes = [(64, 64), (40, 90), (56, 56), (30, 120)]
    return [rng.integers(0, 256, (*sizes[i % len(sizes)], 3), dtype=np.uint8) for i in range(count)]


def start_chat_server(model_dir: Path, home: Path) -> tuple[str, subprocess.Popen]:
    """``transformers serve`` pinned to ``model_dir`` on a free loopback port; returns its API root and process."""
    if importlib.util.find_spec("openai") is None:
        pytest.skip("`transformers serve` needs the openai package (the test extra's transformers[serving])")
    port = _free_port()
    cli = shutil.which("transformers", path=str(Path(sys.executable).parent)) or "transformers"
    cmd = [cli, "serve", str(model_dir), "--device", "cpu", "--host", "127.0.0.1", "--port", str(port)]
    # its /v1/models scans the Hugging Face cache and fails without one: give it an empty one of its own
    env = {**os.environ, "HF_HOME": str(home), "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1"}
    log = (home / "serve.log").open("w")
    process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=env)
    deadline = time.monotonic() + 180
    while time.monotonic() < deadline:
        if process.poll() is not None:
            raise RuntimeError(f"transformers serve exited: {(home / 'serve.log').read_text()[-3000:]}")
        try:
            if requests.get(f"http://127.0.0.1:{port}/health", timeout=2).ok:
                return f"http://127.0.0.1:{port}/v1", process
        except requests.ConnectionError:
            pass
        time.sleep(0.3)
    process.kill()
    raise RuntimeError(f"transformers serve did not start: {(home / 'serve.log').read_text()[-3000:]}")


def stop(process: subprocess.Popen) -> None:
    process.terminate()
    try:
        process.wait(timeout=20)
    except subprocess.TimeoutExpired:
        process.kill()
        process.wait()


@pytest.fixture(scope="module")
def chat_server(tiny_dirs, tmp_path_factory) -> Iterator[str]:
    url, process = start_chat_server(tiny_dirs["qwen2_5_vl"], tmp_path_factory.mktemp("hf-home"))
    yield url
    stop(process)


@pytest.fixture(scope="module")
def remote(chat_server, tiny_dirs) -> OpenAIChatBackend:
    return load_backend("openai_chat", str(tiny_dirs["qwen2_5_vl"]), url=chat_server, max_concurrency="4")


@pytest.fixture(scope="module")
def local(tiny_dirs) -> VLMBackend:
    return load_backend("qwen2_5_vl", str(tiny_dirs["qwen2_5_vl"]))


def test_registered_and_satisfies_the_protocol(remote):
    assert BACKENDS["openai_chat"].endswith(":OpenAIChatBackend")
    assert isinstance(remote, VLMBackend)


def test_remote_greedy_answers_equal_the_local_backend_on_the_same_slices(remote, local):
    images = _images(4)
    prompts = [PROMPTS[i % 2] for i in range(4)]
    sampling = SamplingConfig(max_new_tokens=10)
    # same weights, same chat template, lossless PNG: greedy decoding on the server gives the local answers
    assert remote.generate(images, prompts, sampling=sampling) == local.generate(images, prompts, sampling=sampling)
    twice = remote.generate(images[:2], prompts[:2], n=2, sampling=sampling)
    assert [len(a) for a in twice] == [2, 2] and twice[0][0] == twice[0][1]
    assert remote.generate([], []) == []


def test_box_codec_is_the_local_familys_for_the_served_processor(remote, local):
    assert remote.box_codec.convention is BoxConvention.ABSOLUTE_MODEL_INPUT
    for size in ((90, 40), (64, 64), (130, 30), (96, 96)):
        assert remote.box_codec.for_image(size) == local.box_codec.for_image(size)


def test_sampled_answers_top_up_when_the_server_ignores_n(remote):
    """transformers serve returns one choice whatever ``n`` says; the backend asks again for the rest."""
    sampling = SamplingConfig(max_new_tokens=6, do_sample=True, seed=3)
    answers = remote.generate(_images(2), PROMPTS, n=3, sampling=sampling)
    assert [len(a) for a in answers] == [3, 3] and all(isinstance(t, str) for a in answers for t in a)


def test_server_without_logprobs_gives_no_confidence(remote, local):
    """transformers serve ignores ``logprobs``: answers carry no confidence instead of a made-up one."""
    images = _images(2)
    texts = [a[0] for a in remote.generate(images, PROMPTS, sampling=SamplingConfig(max_new_tokens=6))]
    with pytest.raises(NotImplementedError, match="no log-probs"):
        remote.completion_logprobs(images, PROMPTS, texts)


def test_volume_pipeline_through_the_server(remote):
    """A whole study through the server: answers parsed per slice, no confidence where the server gives none."""
    phantom = make_phantom(3, shape=(32, 32, 8), n_lesions=1, study_id="p3")
    config = PipelineConfig(image_size=48, batch_size=4, max_new_tokens=12, skip_outside_body=False)
    result = VolumePipeline(remote, config).diagnose(Volume(phantom.image.astype("float32"), phantom.affine))
    body = result.to_json()
    assert len(body["slice_answers"]) == 8
    assert all(answer["confidence"] is None for answer in body["slice_answers"])


def test_a_request_the_server_refuses_is_unavailable_with_its_reason(chat_server, tiny_dirs):
    backend = load_backend(
        "openai_chat", "not-the-served-model", url=chat_server, processor=str(tiny_dirs["qwen2_5_vl"]), retries="0"
    )
    with pytest.raises(BackendUnavailable, match=r"refused the request: HTTP 400 .*pinned"):
        backend.generate(_images(1), PROMPTS[:1])


def test_server_down_fails_fast_with_a_message(tiny_dirs):
    url = f"http://127.0.0.1:{_free_port()}/v1"  # nothing listens there
    backend = load_backend(
        "openai_chat", str(tiny_dirs["qwen2_5_vl"]), url=url, retries="2", backoff_s="0.05", connect_timeout_s="1"
    )
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"unavailable: cannot connect .*3 attempts") as caught:
        backend.generate(_images(3), PROMPTS + PROMPTS[:1])
    assert time.monotonic() - started < 10
    assert "127.0.0.1" not in str(caught.value)  # the client's message does not name the model host


def test_options_are_checked_with_their_names(tiny_dirs):
    model = str(tiny_dirs["qwen2_5_vl"])
    with pytest.raises(ValueError, match=r"backend\.url"):
        load_backend("openai_chat", model)
    with pytest.raises(ValueError, match="url='gpu:8000'"):
        load_backend("openai_chat", model, url="gpu:8000")
    with pytest.raises(ValueError, match="max_concurrency='0'"):
        parse_server_options({"url": "http://x/v1", "max_concurrency": "0"})
    with pytest.raises(ValueError, match=r"unknown .*\['lora_r'\]"):
        parse_server_options({"url": "http://x/v1", "lora_r": "8"})
    assert parse_server_options({"url": "http://x/v1", "logprobs": "off"}).logprobs is False
    with pytest.raises(ValueError, match=r"backend\.logprobs must be a boolean \(true/false.*got 'nope'"):
        parse_server_options({"url": "http://x/v1", "logprobs": "nope"})
    with pytest.raises(ValueError, match=r"backend\.processor"):
        load_backend("openai_chat", "served-name", url="http://127.0.0.1:9/v1")
    with pytest.raises(ValueError, match="lora-modules"):
        load_backend("openai_chat", model, url="http://127.0.0.1:9/v1", adapter="/some/adapter")
    # a family whose codec needs no processor: no processor is loaded
    codec = load_backend("openai_chat", "served-name", url="http://127.0.0.1:9/v1", family="qwen3_vl").box_codec
    assert codec.convention is BoxConvention.NORMALIZED_1000


# ----- a scripted server: the failures a real one shows only under load --------------------------------------


class Scripted:
    """A chat-completions endpoint whose answers the test scripts: ``reply(body, call) -> (status, json)``."""

    def __init__(self, reply: Callable[[dict, int], tuple[int, dict]], delay_s: float = 0.0) -> None:
        self.reply, self.delay_s = reply, delay_s
        self.calls, self.in_flight, self.max_in_flight = 0, 0, 0
        self.bodies: list[dict] = []
        self.lock = threading.Lock()
        scripted = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = json.loads(self.rfile.read(int(self.headers["Content-Length"])))
                with scripted.lock:
                    call = scripted.calls
                    scripted.calls += 1
                    scripted.in_flight += 1
                    scripted.max_in_flight = max(scripted.max_in_flight, scripted.in_flight)
                    scripted.bodies.append(body)
                time.sleep(scripted.delay_s)
                status, answer = scripted.reply(body, call)
                with scripted.lock:
                    scripted.in_flight -= 1
                data = json.dumps(answer).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except (BrokenPipeError, ConnectionResetError):  # the client gave up (its timeout)
                    pass

            def do_GET(self) -> None:
                self.send_response(200)
                self.send_header("Content-Length", "0")
                self.end_headers()

            def log_message(self, *args) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.server.daemon_threads = True
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/v1"
        threading.Thread(target=self.server.serve_forever, daemon=True).start()

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()


def answer(text: str, logprobs: list[float] | None = None) -> dict:
    choice: dict = {"index": 0, "message": {"role": "assistant", "content": text}, "finish_reason": "stop"}
    if logprobs is not None:
        choice["logprobs"] = {"content": [{"token": "t", "logprob": v, "top_logprobs": []} for v in logprobs]}
    return {"choices": [choice]}


@pytest.fixture
def scripted() -> Iterator[Callable[..., Scripted]]:
    servers: list[Scripted] = []

    def make(reply, delay_s: float = 0.0) -> Scripted:
        servers.append(Scripted(reply, delay_s))
        return servers[-1]

    yield make
    for server in servers:
        server.close()


def _scripted_backend(server: Scripted, **options: str) -> OpenAIChatBackend:
    return load_backend("openai_chat", "m", url=server.url, family="qwen3_vl", **options)


def test_requests_run_concurrently_but_never_beyond_the_pool(scripted):
    server = scripted(lambda body, call: (200, answer(body["messages"][-1]["content"][1]["text"])), delay_s=0.3)
    backend = _scripted_backend(server, max_concurrency="3")
    prompts = [f"prompt {i}" for i in range(9)]
    started = time.monotonic()
    answers = backend.generate(_images(9), prompts)
    elapsed = time.monotonic() - started
    assert answers == [[p] for p in prompts]  # each answer back at its own slice
    assert server.max_in_flight == 3
    assert elapsed < 9 * 0.3 * 0.6  # three waves of 0.3 s, not nine in a row
    body = server.bodies[0]
    assert body["temperature"] == 0.0 and body["max_tokens"] == SamplingConfig().max_new_tokens
    image_part, text_part = body["messages"][-1]["content"]
    assert image_part["image_url"]["url"].startswith("data:image/png;base64,") and text_part["type"] == "text"


def test_overloaded_server_is_retried_with_backoff(scripted):
    server = scripted(lambda body, call: (503, {"detail": "busy"}) if call < 2 else (200, answer("ok")))
    backend = _scripted_backend(server, retries="2", backoff_s="0.1")
    started = time.monotonic()
    assert backend.generate(_images(1), ["x"]) == [["ok"]]
    assert server.calls == 3 and time.monotonic() - started >= 0.1 + 0.2  # waits 0.1 s, then 0.2 s


def test_a_server_that_stays_overloaded_is_unavailable(scripted):
    server = scripted(lambda body, call: (503, {"detail": "busy"}))
    backend = _scripted_backend(server, retries="1", backoff_s="0")
    with pytest.raises(BackendUnavailable, match=r"HTTP 503 busy \(2 attempts"):
        backend.generate(_images(1), ["x"])


def test_a_slow_server_times_out_instead_of_hanging(scripted):
    server = scripted(lambda body, call: (200, answer("late")), delay_s=3)
    backend = _scripted_backend(server, timeout_s="0.3", retries="1", backoff_s="0")
    started = time.monotonic()
    with pytest.raises(BackendUnavailable, match=r"no answer within 0.3 s \(2 attempts"):
        backend.generate(_images(2), ["x", "y"])
    assert time.monotonic() - started < 2.5


def test_returned_logprobs_become_the_answers_confidence(scripted):
    logprobs = {"first": [-0.1, -0.3], "second": [-2.0]}
    server = scripted(lambda body, call: (200, answer(t := body["messages"][-1]["content"][1]["text"], logprobs[t])))
    backend = _scripted_backend(server)
    images = _images(2)
    texts = [a[0] for a in backend.generate(images, ["first", "second"])]
    assert server.bodies[0]["logprobs"] is True
    scored = backend.completion_logprobs(images, ["first", "second"], texts)
    assert scored.mask.tolist() == [[True, True], [True, False]]
    pipeline = VolumePipeline(backend, PipelineConfig(batch_size=2))
    confidences = pipeline.confidences([_Slice(i) for i in images], ["first", "second"], texts)
    assert confidences == [round(math.exp(-0.2), 4), round(math.exp(-2.0), 4)]
    with pytest.raises(NotImplementedError):  # an answer this backend did not generate has no server log-probs
        backend.completion_logprobs(images[:1], ["first"], ["something else"])


class _Slice:
    def __init__(self, image: np.ndarray) -> None:
        self.image = image


# ----- the app in front of it: 200 while the model server answers, 503 with a message once it is gone ----------


@pytest.mark.integration
def test_app_answers_through_the_server_then_503_when_it_is_gone(monailabel_server, tiny_dirs, tmp_path):
    from monailabel_evlf.data.phantoms import write_sample_dataset

    studies = tmp_path / "studies"
    (study,) = write_sample_dataset(studies, n=1, shape=(32, 32, 8))
    url, chat = start_chat_server(tiny_dirs["qwen2_5_vl"], tmp_path)
    try:
        conf = {
            "backend": "openai_chat",
            "model": str(tiny_dirs["qwen2_5_vl"]),
            "backend.url": url,
            "backend.retries": "1",
            "backend.backoff_s": "0.1",
            "image_size": "48",
            "max_new_tokens": "8",
        }
        app = monailabel_server(studies, conf, timeout=240)
        ok = requests.post(f"{app.url}/infer/evlf_diagnosis", params={"image": study}, timeout=120)
        assert ok.status_code == 200, ok.text[:2000]
        assert ok.json()["model"]["backend"] == "openai_chat"
    finally:
        stop(chat)
    started = time.monotonic()
    gone = requests.post(f"{app.url}/infer/evlf_diagnosis", params={"image": study}, timeout=120)
    assert gone.status_code == 503, gone.text[:2000]
    assert "inference server unavailable: cannot connect" in gone.json()["detail"]
    assert time.monotonic() - started < 30


@pytest.mark.integration
def test_app_refuses_training_with_a_remote_backend_before_anything_starts(monailabel_server, tiny_dirs, tmp_path):
    """Training stays local: 409 naming the way (a local backend, vLLM LoRA) at once, no child, no adapter."""
    from monailabel_evlf.data.phantoms import write_sample_dataset

    studies = tmp_path / "studies"
    write_sample_dataset(studies, n=1, shape=(32, 32, 8))
    adapters = tmp_path / "adapters"
    conf = {"backend": "openai_chat", "model": str(tiny_dirs["qwen2_5_vl"]), "adapters": str(adapters)}
    # no model server at all: the app starts (a warning) and training is refused all the same
    app = monailabel_server(studies, {**conf, "backend.url": f"http://127.0.0.1:{_free_port()}/v1"}, timeout=240)
    before = sorted(adapters.rglob("*"))
    for url in (f"{app.url}/train/evlf_train", f"{app.url}/train/"):
        refused = requests.post(url, json={"method": "grpo", "steps": 1}, timeout=30)
        assert refused.status_code == 409, refused.text[:2000]
        detail = refused.json()["detail"]
        assert "training needs a local backend" in detail and "vLLM --enable-lora" in detail, detail
    assert "No Train Tasks" in requests.get(f"{app.url}/train/", timeout=30).text  # no training child started
    assert sorted(adapters.rglob("*")) == before and not any(p.is_file() for p in before)


@pytest.mark.slow
def test_an_adapter_trained_here_is_served_merged(local, tiny_dirs, tmp_path):
    """The route docs/scale.md gives for adapters with trained connectors (vLLM's LoRA modules cannot hold
    them): merge into the base, serve the merged folder; the server then answers as the local model + adapter."""
    import torch

    model_dir = str(tiny_dirs["qwen2_5_vl"])
    trained = load_backend("qwen2_5_vl", model_dir)
    with torch.no_grad():  # an adapter as training leaves it: LoRA and the merger connector changed
        generator = torch.Generator().manual_seed(1)
        for p in trained.trainable_parameters():
            p.add_(torch.randn(p.shape, generator=generator) * 0.5)
    trained.save_adapter(tmp_path / "adapter")
    merged_dir = tmp_path / "merged"
    trained.peft_model.merge_and_unload().save_pretrained(merged_dir, safe_serialization=True)
    trained.processor.save_pretrained(merged_dir)
    tuned = load_backend("qwen2_5_vl", model_dir, adapter=str(tmp_path / "adapter"))  # how the app serves it

    url, process = start_chat_server(merged_dir, tmp_path)
    try:
        remote = load_backend("openai_chat", str(merged_dir), url=url)
        images, sampling = _images(2), SamplingConfig(max_new_tokens=10)
        served = remote.generate(images, PROMPTS, sampling=sampling)
        assert served == tuned.generate(images, PROMPTS, sampling=sampling)
        assert served != local.generate(images, PROMPTS, sampling=sampling)  # the adapter changed the answers
    finally:
        stop(process)
