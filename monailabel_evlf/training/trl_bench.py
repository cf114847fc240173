"""TRL's trainers vs the compact loops on one machine: seconds per step and peak RSS, same model, samples, config.

``python -m monailabel_evlf.training.trl_bench [--model demo] [--steps 5]`` runs each (trainer, stage) pair in
a fresh child process (peak RSS is per process: ``ru_maxrss``) and prints a Markdown table. "s/step" is the
median of the steps after the first; "stage s" is the whole stage call including TRL's trainer set-up, which is
what a few-step in-app round pays.

The model and training imports are lazy (inside :func:`measure`): the parent process only starts the children
and prints their table, so only the measured children load torch, monai and transformers.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import subprocess
import sys
import time
from typing import Any

from monailabel_evlf.training.config import GRPOConfig, SFTConfig, TRLConfig


def measure(trainer: str, stage: str, model: str, steps: int) -> dict[str, Any]:
    """One (trainer, stage) run in this process."""
    from monailabel_evlf.data.phantoms import make_phantom
    from monailabel_evlf.imaging.windowing import resolve_window
    from monailabel_evlf.model import load_backend
    from monailabel_evlf.training.finetune import GRPOStage, SFTStage, grounding_rewards
    from monailabel_evlf.training.samples import SampleOptions, phantom_samples

    backend = load_backend("evlf", model)
    window = resolve_window("model", getattr(backend, "input_window", None))
    options = SampleOptions(box_codec=backend.box_codec, size=(96, 96), window=window, tasks=("grounding",))
    phantom = make_phantom(3, shape=(96, 96, 40), n_lesions=2, study_id="bench")
    samples = phantom_samples(phantom.image, phantom.affine, phantom.ground_truth, options, normal_slices=2)
    run = TRLConfig(output_dir="/tmp/evlf-trl-bench", report_to="none")
    if stage == "grpo":
        config = GRPOConfig(steps=steps, batch_size=2, group_size=4, max_new_tokens=48, micro_batch_size=8)
        runner = GRPOStage(config, grounding_rewards(), trainer=trainer, trl=run)
    else:
        config = SFTConfig(epochs=1, batch_size=4)
        samples = samples[: 4 * steps]
        runner = SFTStage(config, trainer=trainer, trl=run)
    started = time.perf_counter()
    history, _ = runner.run(backend, samples, None)
    total = time.perf_counter() - started
    per_step = [h["seconds"] for h in history]
    return {
        "trainer": trainer,
        "stage": stage,
        "steps": len(history),
        "s_per_step": statistics.median(per_step[1:] or per_step),
        "stage_s": total,
        "peak_rss_mib": resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024,
    }


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--model", default="demo", help="model preset or path (default demo)")
    parser.add_argument("--steps", type=int, default=5)
    parser.add_argument("--child", nargs=2, metavar=("TRAINER", "STAGE"), help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.child:
        print(json.dumps(measure(*args.child, args.model, args.steps)))
        return 0
    rows = []
    for stage in ("grpo", "sft"):
        for trainer in ("compact", "trl"):
            command = [
                sys.executable,
                "-m",
                "monailabel_evlf.training.trl_bench",
                "--model",
                args.model,
                "--steps",
                str(args.steps),
            ]
            out = subprocess.run([*command, "--child", trainer, stage], capture_output=True, text=True, check=True)
            rows.append(json.loads(out.stdout.strip().splitlines()[-1]))
    print("| stage | trainer | steps | s/step (median) | stage s (incl. set-up) | peak RSS MiB |")
    print("|---|---|---:|---:|---:|---:|")
    for r in rows:
        print(
            f"| {r['stage']} | {r['trainer']} | {r['steps']} | {r['s_per_step']:.3f} | {r['stage_s']:.2f} "
            f"| {r['peak_rss_mib']:.0f} |"
        )
    return 0


if __name__ == "__main__":
    sys.exit(main())
