"""``evlf bench infer``: how fast one volume goes through the model, and what the server adds on top.

Two comparisons in one run, same model, same volume, same options:

1. slices/s with ``batch_size`` slices per ``generate`` call vs one call per slice (target: >= 4x);
2. wall time of ``POST /infer/evlf_grounding`` on a real MONAI Label server (started here on 127.0.0.1) vs the
   same grounding in-process, both including reading the volume from disk (target: HTTP <= 1.10x).

Times are medians over ``--repeats`` runs after one warm-up run each.

The model, imaging and HTTP imports are lazy (inside the functions that run the benchmark): ``evlf`` imports
this module to register the sub-command, and ``evlf --help`` should not load monai and transformers.
"""

from __future__ import annotations

import argparse
import json
import logging
import socket
import statistics
import subprocess
import tempfile
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import replace
from pathlib import Path
from typing import Any

from monailabel_evlf.app.commands import prepare_app_dir, server_command, server_env

logger = logging.getLogger(__name__)


def _median_seconds(fn, repeats: int) -> float:
    fn()  # warm-up: lazy initialisation, caches, first-call allocations
    times = []
    for _ in range(repeats):
        started = time.perf_counter()
        fn()
        times.append(time.perf_counter() - started)
    return statistics.median(times)


def bench_batching(pipeline, volume, batch_size: int, repeats: int) -> dict[str, float]:
    """slices/s of greedy grounding answers, one call per slice vs ``batch_size`` slices per call."""
    from monailabel_evlf.tasks.prompts import grounding_prompt

    _, slices = pipeline.render(volume)
    prompts = [grounding_prompt(pipeline.config.modality, None, pipeline.backend.box_codec)] * len(slices)
    results = {"slices": float(len(slices))}
    original = pipeline.config
    try:
        for name, size in (("single", 1), ("batched", batch_size)):
            pipeline.config = replace(original, batch_size=size)
            seconds = _median_seconds(lambda: pipeline.generate(slices, prompts), repeats)
            results[f"{name}_slices_per_s"] = len(slices) / seconds
    finally:
        pipeline.config = original
    results["batch_speedup"] = results["batched_slices_per_s"] / results["single_slices_per_s"]
    return results


def bench_http(server_url: str, image_id: str, image_path: str, pipeline, repeats: int) -> dict[str, float]:
    """Median seconds: HTTP grounding (JSON output) vs in-process load + ground + result JSON."""
    import requests

    from monailabel_evlf.imaging.volume import load_volume

    def over_http() -> None:
        response = requests.post(
            f"{server_url}/infer/evlf_grounding",
            params={"image": image_id, "output": "json"},
            data={"params": json.dumps({"output": "json"})},
            timeout=600,
        )
        response.raise_for_status()

    def in_process() -> None:
        json.dumps(pipeline.ground(load_volume(image_path)).to_json())

    http_s = _median_seconds(over_http, repeats)
    local_s = _median_seconds(in_process, repeats)
    return {"http_s": http_s, "in_process_s": local_s, "http_over_in_process": http_s / local_s}


def run_bench(args: argparse.Namespace) -> dict[str, Any]:
    from monailabel_evlf.app.config import parse_app_config, resolve_model
    from monailabel_evlf.app.serving import load_configured_backend, pipeline_config
    from monailabel_evlf.imaging.volume import load_volume
    from monailabel_evlf.inference import VolumePipeline

    studies = Path(args.studies)
    images = sorted(studies.glob("*.nii.gz"))
    if not images:
        raise ValueError(f"no *.nii.gz studies in {studies} (make some with: evlf make-sample-data {studies})")
    image = studies / f"{args.study}.nii.gz" if args.study else images[0]
    if not image.is_file():
        raise FileNotFoundError(f"no study {image}")
    conf = {"backend": args.backend, "model": args.model, "batch_size": str(args.batch_size), **dict(args.conf)}
    config = parse_app_config(conf)
    model, note = resolve_model(config)
    pipeline = VolumePipeline(load_configured_backend(config, model), pipeline_config(config))
    volume = load_volume(image)
    report: dict[str, Any] = {
        "model": pipeline.backend.model_id,
        "note": note,
        "study": image.name.removesuffix(".nii.gz"),
        "batch_size": args.batch_size,
        "repeats": args.repeats,
        **bench_batching(pipeline, volume, args.batch_size, args.repeats),
    }
    if not args.no_http:
        with running_server(studies, conf) as url:
            report.update(bench_http(url, report["study"], str(image), pipeline, args.repeats))
    return report


@contextmanager
def running_server(
    studies: Path | str,
    conf: dict[str, str],
    timeout: float = 300,
    env: dict[str, str] | None = None,
    headers: dict[str, str] | None = None,
) -> Iterator[str]:
    """A MONAI Label server with the EVLF app on a free loopback port; yields its URL, stops it on exit.

    ``studies`` is a folder or a DICOMweb URL; ``env`` adds environment variables (MONAI Label settings);
    ``headers`` go with the readiness probe (``/info/``), e.g. the bearer token of a server with token auth."""
    import requests

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    cmd = server_command(prepare_app_dir(), studies, "127.0.0.1", port, conf)
    url = f"http://127.0.0.1:{port}"
    with tempfile.NamedTemporaryFile("w", suffix=".log", prefix="evlf-bench-server-", delete=False) as log:
        process = subprocess.Popen(cmd, stdout=log, stderr=subprocess.STDOUT, env=server_env(env))
        try:
            deadline = time.monotonic() + timeout
            while True:
                if process.poll() is not None:
                    raise RuntimeError(f"server exited with {process.returncode}; {_log_tail(log.name)}")
                if time.monotonic() > deadline:
                    raise RuntimeError(f"server did not start within {timeout} s; {_log_tail(log.name)}")
                try:
                    if requests.get(f"{url}/info/", headers=headers, timeout=2).ok:
                        break
                except requests.ConnectionError:
                    pass
                time.sleep(0.5)
            yield url
        finally:
            process.terminate()
            try:
                process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                process.kill()


def _log_tail(path: str, lines: int = 40) -> str:
    """The end of a server log, for an error that has to explain itself where the log file is gone (CI)."""
    tail = Path(path).read_text(errors="replace").splitlines()[-lines:]
    return f"log: {path}, last {len(tail)} lines:\n" + "\n".join(tail)


def format_report(report: dict[str, Any]) -> str:
    lines = [f"model {report['model']}  study {report['study']}  {int(report['slices'])} slices"]
    if report.get("note"):
        lines.append(f"note: {report['note']}")
    lines.append(
        f"one call per slice   {report['single_slices_per_s']:8.2f} slices/s\n"
        f"batch of {report['batch_size']:<3d}         {report['batched_slices_per_s']:8.2f} slices/s"
        f"   speedup {report['batch_speedup']:.2f}x (target >= 4x)"
    )
    if "http_s" in report:
        lines.append(
            f"in-process grounding {report['in_process_s']:8.3f} s\n"
            f"HTTP /infer          {report['http_s']:8.3f} s   ratio {report['http_over_in_process']:.3f} "
            "(target <= 1.10)"
        )
    return "\n".join(lines)


def bench_infer(args: argparse.Namespace) -> int:
    report = run_bench(args)
    print(format_report(report))
    if args.json:
        Path(args.json).write_text(json.dumps(report, indent=2))
    return 0


def register(subparsers: argparse._SubParsersAction) -> None:
    parser = subparsers.add_parser("infer", help="volume inference speed: batched vs per-slice, HTTP vs in-process")
    parser.add_argument("studies", help="a folder of *.nii.gz studies (e.g. from evlf make-sample-data)")
    parser.add_argument("--study", help="study id (default: the first)")
    parser.add_argument("--backend", default="evlf")
    parser.add_argument("--model", default="demo", help="preset, Hugging Face id or local path")
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--no-http", action="store_true", help="skip the server comparison")
    parser.add_argument("--json", help="also write the numbers to this JSON file")
    parser.add_argument(
        "--conf", nargs=2, action="append", default=[], metavar=("KEY", "VALUE"), help="app option, as for the server"
    )
    parser.set_defaults(func=bench_infer)
