"""benchmarks/gpu_check.py in its CPU mode: the same stages on the tiny models (~1 min on 2 cores)."""

from __future__ import annotations

import importlib.util
import json
import shutil
import subprocess
import sys
import time
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
SCRIPT = REPO / "benchmarks" / "gpu_check.py"
STAGES = ("models", "train_no", "inference", "batch_invariance", "inference_compile", "train_no_compile")


@pytest.fixture(scope="module")
def gpu_check():
    spec = importlib.util.spec_from_file_location("gpu_check", SCRIPT)
    module = importlib.util.module_from_spec(spec)
    sys.modules["gpu_check"] = module  # dataclasses look their module up there
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def work_dir(tmp_path_factory) -> Path:
    return tmp_path_factory.mktemp("gpu_check_work")


def test_tiny_cpu_run_writes_every_stage_and_fills_the_results_template(work_dir, tmp_path):
    out = tmp_path / "out"
    started = time.perf_counter()
    command = [sys.executable, str(SCRIPT), "--size", "tiny", "--device", "cpu", "--out", str(out), "--work_dir", str(work_dir)]
    done = subprocess.run(command, capture_output=True, text=True, timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    print(f"gpu_check tiny cpu: {time.perf_counter() - started:.0f} s wall")
    results = json.loads((out / "results.json").read_text())
    assert {"device_name", "date", "torch", "peak_tflops", "elapsed_s", "stages"} <= set(results)
    stages = results["stages"]
    assert tuple(stages) == STAGES
    assert not {name: stage["error"] for name, stage in stages.items() if "error" in stage}

    train = stages["train_no"]
    assert train["reference"]["pairs_per_s"] > 0 and train["ours"]["pairs_per_s"] > 0 and train["speedup"] > 0
    assert train["ours"]["flops_per_step"] > 1e9 and train["ours"]["model_tflops_per_s"] > 0
    assert train["ours"]["planned_peak_gib"] > 0  # set beside torch.cuda.max_memory_allocated on a GPU (measured_over_planned)
    inference = stages["inference"]
    assert inference["max_pixel_difference_where_seeds_agree"] <= 2
    for loop in ("reference", "ours"):
        assert inference[loop]["images_per_s_30_steps"] > 0 and inference[loop]["graphs_compiled_while_timed"] == 0
    assert stages["batch_invariance"]["max_pixel_difference"] <= 2
    compiled = stages["inference_compile"]["ours"]
    assert compiled["graphs_compiled_while_timed"] == 0 and compiled["max_pixel_difference_vs_eager"] <= 2 and compiled["compile_s"] > 0
    assert stages["train_no_compile"]["ours"]["graphs_compiled"] == 1  # one graph for warm-up and timed steps

    results_md = tmp_path / "RESULTS.md"
    shutil.copy(REPO / "benchmarks" / "RESULTS.md", results_md)
    rewrite = [*command, "--write-results", "--no-run", "--results_md", str(results_md)]
    assert subprocess.run(rewrite, capture_output=True, text=True, timeout=300).returncode == 0
    text = results_md.read_text()
    section = text.split("<!-- gpu-check:begin -->")[1].split("<!-- gpu-check:end -->")[0]
    assert f"GPU check on {results['device_name']}, {results['date']}" in section
    assert "| no | reference |" in section and "| ours + compile |" in section and "every stage finished" in section
    assert "Not measured yet" not in section and "{training_rows}" in text  # the template itself stays


def test_a_broken_stage_is_reported_and_the_run_goes_on(gpu_check, work_dir, tmp_path, monkeypatch):
    def broken(*args, **kwargs):
        raise RuntimeError("broken on purpose")

    monkeypatch.setattr(gpu_check.inference_benchmark, "reference_loop", broken)
    written_before = {}
    original = gpu_check.stage_batch_invariance

    def spy(run, name):  # what results.json holds when the next stage starts
        written_before.update(json.loads(run.path.read_text())["stages"])
        original(run, name)

    monkeypatch.setattr(gpu_check, "stage_batch_invariance", spy)
    out = tmp_path / "out"
    results = gpu_check.main(
        ["--size", "tiny", "--device", "cpu", "--out", str(out), "--work_dir", str(work_dir), "--stages", "inference", "batch_invariance"]
    )
    stages = json.loads((out / "results.json").read_text())["stages"]
    assert stages == results["stages"]
    assert stages["inference"]["error"] == "RuntimeError: broken on purpose" and "reference_loop" in stages["inference"]["traceback"]
    assert written_before["inference"]["error"] == stages["inference"]["error"]  # written when the stage ended
    assert "error" not in stages["batch_invariance"] and stages["batch_invariance"]["max_pixel_difference"] <= 2


def test_a_stage_over_its_budget_is_stopped(gpu_check):
    started = time.perf_counter()
    with pytest.raises(gpu_check.StageTimeout), gpu_check.time_limit(0.2) as limit:
        time.sleep(5)
    assert time.perf_counter() - started < 2 and limit["expired"]


@pytest.mark.parametrize(
    ("name", "tflops"), [("NVIDIA H100 PCIe", 756.0), ("NVIDIA H100 80GB HBM3", 989.0), ("NVIDIA H200", 989.0), ("CPU (x86_64)", None)]
)
def test_peak_flops_table(gpu_check, name, tflops):
    assert gpu_check.peak_tflops(name) == tflops


def test_the_light_parsers_offer_every_size_and_shape(gpu_check):
    """benchmark_cli names the sizes and shapes without importing them (they need torch): the names must stay in sync."""
    import benchmark_cli  # on sys.path once gpu_check is loaded

    from stand_ins.sdxl import SHAPES

    assert benchmark_cli.SIZE_NAMES == tuple(sorted(gpu_check.SIZES))
    assert benchmark_cli.SHAPE_NAMES == tuple(sorted(SHAPES))
