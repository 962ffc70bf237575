"""`patchdpo.sharding`: the frozen UNet sharded with FSDP2 over 2 processes while the IP-Adapter trains.

One launch (`ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2`, gloo; tests/kit/torchrun_sharding.py)
trains the tiny SDXL stand-in with its IP-Adapter on PatchDPO's loss, sharded and through DDP, in
fp32 and bf16. In fp32 the two differ only in the order gradients are summed, so they meet the
layout-invariance tolerance of tests/test_train_distributed.py. In bf16 autograd sums some bf16
gradients in another order once FSDP's hooks sit in the graph (the down blocks' skip connections),
so they agree at that tolerance after one step, after which Adam amplifies bf16 rounding in any two
layouts alike; the bf16 run is what resumes exactly. Also checked: a training state is the same
files either way (each layout resumes from the other's), image_dpo's reference adapter on the
sharded model, the bytes each process holds, and the FLUX rows of docs/memory.md.
"""

from __future__ import annotations

import contextlib
import importlib.util
import io
import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file

from common.training_state import MANIFEST_NAME, TENSORS_NAME, TRAINING_STATE_DIR
from patchdpo.sharding import shard_bytes
from tests.kit.torchrun_sharding import DPO_STEPS, LR, STATE_AT, STEPS, WEIGHTS_NAME

ROOT = Path(__file__).resolve().parents[1]
# The layout-invariance tolerance of tests/test_train_distributed.py: float rounding moves the 99th percentile
# of |Δw| by far less than lr/100, a different draw (or a gradient that is not synchronised) by ~lr.
P99_TOLERANCE = LR * 1e-2


@pytest.fixture(scope="module")
def record(tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("sharding")
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2"]
    result = subprocess.run(
        [*command, "-m", "tests.kit.torchrun_sharding", str(out)], cwd=ROOT, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-6000:]
    return out


def ranks(record: Path) -> list[dict]:
    return [json.loads((record / f"rank{rank}.json").read_text()) for rank in range(2)]


def adapter_at(record: Path, run: str, step: int) -> dict[str, torch.Tensor]:
    prefix = f"step{step}."
    return {key[len(prefix) :]: value for key, value in load_file(str(record / f"{run}.safetensors")).items() if key.startswith(prefix)}


def deviation(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> tuple[float, float]:
    """(max, 99th percentile) of |a - b| over every adapter weight."""
    assert a.keys() == b.keys()
    values = torch.cat([(a[key] - b[key]).abs().flatten() for key in a])
    return values.max().item(), torch.quantile(values, 0.99).item()


def test_sharded_training_equals_ddp_within_the_invariance_tolerance(record):
    for step in range(1, STEPS + 1):
        largest, p99 = deviation(adapter_at(record, "sharded", step), adapter_at(record, "ddp", step))
        print(f"fp32 step {step}: sharded vs DDP max |dw| {largest:.2e}, p99 {p99:.2e}")
        assert p99 < P99_TOLERANCE and largest < 10 * P99_TOLERANCE, (step, largest, p99)
    moved = deviation(adapter_at(record, "ddp", STEPS), adapter_at(record, "ddp", 0))[1]
    assert moved > 10 * P99_TOLERANCE, moved  # control: training moved the adapter far beyond the tolerance
    sharded, ddp = ranks(record)[0]["sharded"]["norms"], ranks(record)[0]["ddp"]["norms"]
    assert sharded == pytest.approx(ddp, rel=1e-5)  # the clipped norm is the whole gradient's, not one shard's


def test_bf16_sharded_step_equals_ddp_within_the_invariance_tolerance(record):
    largest, p99 = deviation(adapter_at(record, "sharded_bf16", 1), adapter_at(record, "ddp_bf16", 1))
    print(f"bf16 step 1: sharded vs DDP max |dw| {largest:.2e}, p99 {p99:.2e}")
    assert p99 < P99_TOLERANCE, (largest, p99)
    assert ranks(record)[0]["sharded_bf16"]["norms"][0] == pytest.approx(ranks(record)[0]["ddp_bf16"]["norms"][0], rel=1e-3)


def test_image_dpo_reference_on_the_sharded_model_is_the_starting_adapter(record):
    """`swapped_weights` gives the sharded model the reference adapter that `functional_call` gives the unsharded one."""
    for step in range(1, DPO_STEPS + 1):
        largest, p99 = deviation(adapter_at(record, "sharded_image_dpo", step), adapter_at(record, "ddp_image_dpo", step))
        print(f"image_dpo step {step}: sharded vs DDP max |dw| {largest:.2e}, p99 {p99:.2e}")
        assert p99 < P99_TOLERANCE and largest < 10 * P99_TOLERANCE, (step, largest, p99)


def test_a_resumed_sharded_run_equals_the_uninterrupted_one_exactly(record):
    for step in range(STATE_AT, STEPS + 1):
        resumed, uninterrupted = adapter_at(record, "resumed_bf16", step), adapter_at(record, "sharded_bf16", step)
        assert all(torch.equal(resumed[key], uninterrupted[key]) for key in uninterrupted), step
    final = [(record / run / "model.safetensors").read_bytes() for run in ("resumed_bf16", "sharded_bf16")]
    assert final[0] == final[1]
    assert [r["resumed_bf16"]["norms"] for r in ranks(record)] == [r["sharded_bf16"]["norms"][STATE_AT:] for r in ranks(record)]


def test_each_layout_resumes_from_the_others_training_state(record):
    """A training state is one format: a sharded run resumes from an unsharded one's and the other way round."""
    for run in ("sharded_from_ddp", "ddp_from_sharded"):
        assert deviation(adapter_at(record, run, STATE_AT), adapter_at(record, run.split("_from_")[1], STATE_AT)) == (0.0, 0.0)
        for step in range(STATE_AT + 1, STEPS + 1):
            largest, p99 = deviation(adapter_at(record, run, step), adapter_at(record, "ddp", step))
            assert p99 < P99_TOLERANCE and largest < 10 * P99_TOLERANCE, (run, step, largest, p99)


def _layout(path: Path) -> dict[str, tuple[tuple[int, ...], str]]:
    with safe_open(str(path), "pt") as tensors:
        return {key: (tuple(tensors.get_slice(key).get_shape()), tensors.get_slice(key).get_dtype()) for key in tensors.keys()}


def test_a_sharded_training_state_is_the_files_an_unsharded_run_writes(record):
    sharded, ddp = (record / run / f"checkpoint-{STATE_AT}" / TRAINING_STATE_DIR for run in ("sharded", "ddp"))
    for name in (WEIGHTS_NAME, TENSORS_NAME):
        assert _layout(sharded / name) == _layout(ddp / name), name
    manifests = [json.loads((state / MANIFEST_NAME).read_text()) for state in (sharded, ddp)]
    for manifest in manifests:
        manifest.pop("files")  # sha256 of the files: their values differ by float rounding
    assert manifests[0] == manifests[1]
    moments = [load_file(str(state / TENSORS_NAME)) for state in (sharded, ddp)]
    assert all(torch.allclose(moments[0][key], moments[1][key], rtol=1e-4, atol=1e-9) for key in moments[1])


def test_the_frozen_base_held_per_process_halves_over_two_processes(record):
    for rank in ranks(record):
        unsharded, sharded = rank["ddp"], rank["sharded"]
        assert sharded["frozen_bytes_unsharded"] == unsharded["frozen_bytes"]
        assert sharded["frozen_bytes"] == pytest.approx(unsharded["frozen_bytes"] / 2, rel=1e-3)
        assert sharded["trainable_bytes"] == pytest.approx(unsharded["trainable_bytes"] / 2, rel=1e-3)
        assert rank["sharded_bf16"]["frozen_bytes"] == pytest.approx(sharded["frozen_bytes"] / 2, rel=1e-3)  # held in bf16
        for run in ("sharded", "sharded_bf16"):  # the arithmetic of the FLUX memory rows (benchmarks/sharding_memory.py)
            assert (rank[run]["planned_frozen_bytes"], rank[run]["planned_trainable_bytes"]) == (
                rank[run]["frozen_bytes"],
                rank[run]["trainable_bytes"],
            )


def test_accumulated_micro_batches_sync_once_and_equal_one_batch(record):
    for step in range(1, STEPS + 1):
        largest, p99 = deviation(adapter_at(record, "accumulated", step), adapter_at(record, "ddp", step))
        assert p99 < P99_TOLERANCE and largest < 10 * P99_TOLERANCE, (step, largest, p99)
    for rank in ranks(record):  # no reduce-scatter before the last micro-batch: the sharded gradients do not exist yet
        assert rank["accumulated"]["unsynced_grads_absent"] == [True] * STEPS


def test_a_planned_shard_is_dim_0_cut_in_equal_padded_rows():
    """FSDP2's rule (`planned_bytes`, the FLUX rows): ceil(rows / N) rows per process, the last one padded."""
    assert shard_bytes((5, 3), element_size=4, processes=2) == 3 * 3 * 4
    assert shard_bytes((3072, 4096), element_size=2, processes=8) == 3072 * 4096 * 2 // 8
    assert shard_bytes((3,), element_size=4, processes=8) == 4


def test_the_flux_rows_of_docs_memory_are_what_the_benchmark_prints():
    """benchmarks/sharding_memory.py on the meta device (FLUX.1-dev config + XLabs adapter) gives the rows docs/memory.md shows."""
    spec = importlib.util.spec_from_file_location("sharding_memory", ROOT / "benchmarks" / "sharding_memory.py")
    benchmark = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(benchmark)
    printed = io.StringIO()
    with contextlib.redirect_stdout(printed):
        benchmark.main()
    rows = [line for line in printed.getvalue().splitlines() if line.startswith("| ") and line[2].isdigit()]
    assert len(rows) == 4 and all(row in (ROOT / "docs" / "memory.md").read_text() for row in rows), rows
    assert "11.90 B parameters" in printed.getvalue() and "0.491 B" in printed.getvalue()
