"""The speed benchmarks stay runnable: a tiny-shape run of each, with its own correctness checks."""

from __future__ import annotations

import json
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


def test_train_benchmark_runs(tmp_path) -> None:
    stdout = _run(
        "train_benchmark.py", "--shape", "tiny", "--resolution", "32", "--steps", "2", "--warmup", "1", "--work_dir", str(tmp_path)
    )
    assert "reference" in stdout and "ours" in stdout
