"""The speed benchmarks stay runnable and honest: a tiny-shape run of each fails when its two loops disagree.

Each benchmark compares its loops' outputs itself (images where the seeds agree; first-step losses)
and exits non-zero when they differ; these tests run them and read the comparison back.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]


def _run(script: str, *args: str) -> str:
    done = subprocess.run([sys.executable, str(REPO / "benchmarks" / script), *args], capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-2000:]
    return done.stdout


def test_inference_benchmark_matches_outputs_and_reports_speed(tmp_path) -> None:
    stdout = _run(
        "inference_benchmark.py",
        "--shape",
        "tiny",
        "--size",
        "32",
        "--num_inference_steps",
        "2",
        "--prompts_per_subject",
        "2",
        "--output",
        str(tmp_path / "result.json"),
    )
    assert "speedup" in stdout
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["images"] == 4 and result["max_pixel_difference_where_seeds_agree"] <= 2
    assert result["reference_images_per_s"] > 0 and result["ours_images_per_s"] > 0


def test_flux_inference_benchmark_gives_diffusers_load_ip_adapter_images(tmp_path) -> None:
    """Ours (FluxIPAdapter) against FluxPipeline + load_ip_adapter; ours in one batch of both subjects (the reference: one per call)."""
    args = ["--base_model", "flux", "--shape", "tiny", "--size", "32", "--num_inference_steps", "2", "--prompts_per_subject", "2"]
    _run("inference_benchmark.py", *args, "--output", str(tmp_path / "result.json"))
    result = json.loads((tmp_path / "result.json").read_text())
    assert result["base_model"] == "flux" and result["images"] == 4 and result["max_pixel_difference_where_seeds_agree"] <= 2


def test_train_benchmark_loops_compute_the_same_loss(tmp_path) -> None:
    stdout = _run(
        "train_benchmark.py", "--shape", "tiny", "--resolution", "32", "--steps", "2", "--warmup", "1", "--work_dir", str(tmp_path)
    )
    variants = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    losses = {result["variant"]: result["first_loss"] for result in variants}
    assert losses.keys() == {"reference", "ours_no_cache", "ours"}
    assert all(abs(loss - losses["reference"]) <= 1e-4 * losses["reference"] for loss in losses.values()), losses
    assert all(result["pairs_per_cpu_s"] > 0 for result in variants)


def test_flux_train_benchmark_loops_compute_the_same_loss(tmp_path) -> None:
    """The diffusers-style FLUX loop (FluxPipeline + load_ip_adapter, all encoded per step) and our step agree on the loss."""
    stdout = _run(
        "train_benchmark.py", "--base_model", "flux", "--shape", "tiny", "--resolution", "32", "--steps", "1", "--warmup", "1",
        "--work_dir", str(tmp_path),
    )  # fmt: skip
    variants = [json.loads(line) for line in stdout.splitlines() if line.startswith("{")]
    losses = {result["variant"]: result["first_loss"] for result in variants}
    assert losses.keys() == {"reference", "ours_no_cache", "ours"}
    assert all(abs(loss - losses["reference"]) <= 1e-4 * losses["reference"] for loss in losses.values()), losses
    assert "speed-up" in stdout


def test_startup_benchmark_reports_first_start_and_resume(tmp_path):
    script = Path(__file__).resolve().parents[1] / "benchmarks" / "startup_benchmark.py"
    env = {**os.environ, "PYTHONPATH": str(script.parents[1]), "OMP_NUM_THREADS": "1"}
    done = subprocess.run(
        [sys.executable, str(script), "--pairs", "6", "--processes", "1", "--out", str(tmp_path)],
        env=env,
        capture_output=True,
        text=True,
        timeout=600,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    (row,) = json.loads((tmp_path / "results.json").read_text())
    assert row["pairs"] == 6 and row["first_start_s"] >= 0 and row["resume_s"] >= 0
    assert "| 6 | 1 |" in done.stdout
