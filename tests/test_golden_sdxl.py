"""The paper's SDXL path, bit for bit: first-step losses, trained adapters and DreamBench images as recorded.

Recorded on the SDXL stand-ins before the trainer was made base-model generic; every later change
must leave these numbers exactly as they were. Each training run records the loss logged at step 1
and a digest of every trainable tensor after each optimizer step; the inference run records a
digest of each image's pixels.

Covered: `patch_dpo` in fp32 and bf16, without and with `--cache_dir`, on 1 process (in-process) and
2 processes (torchrun); `mse` and `image_dpo` in fp32; DreamBench inference in both settings.

To re-record after a change that is *meant* to change these numbers (say why in the commit):

    PATCHDPO_RECORD_GOLDEN=1 python -m pytest -q tests/test_golden_sdxl.py
"""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate.state import AcceleratorState
from PIL import Image
from safetensors.torch import load_file
from torch.optim.optimizer import register_optimizer_step_post_hook

import inference_dreambooth
import train_patchdpo
from stand_ins.pairs import PairData, save_pair_data

REPO = Path(__file__).resolve().parents[1]
GOLDEN = REPO / "tests" / "golden" / "sdxl.json"
RECORD = os.environ.get("PATCHDPO_RECORD_GOLDEN") == "1"
DATA_ROOT = REPO.parent / "shared" / "dreambench"
STEPS = 3

#: name -> (extra flags, processes)
TRAINING_RUNS = {
    "patch_dpo_fp32": (("--loss", "patch_dpo"), 1),
    "patch_dpo_fp32_cache": (("--loss", "patch_dpo", "--cache_dir", "{cache}"), 1),
    "patch_dpo_bf16": (("--loss", "patch_dpo", "--mixed_precision", "bf16"), 1),
    "patch_dpo_bf16_cache": (("--loss", "patch_dpo", "--mixed_precision", "bf16", "--cache_dir", "{cache}"), 1),
    "mse_fp32": (("--loss", "mse"), 1),
    "image_dpo_fp32": (("--loss", "image_dpo", "--dpo_beta", "50"), 1),
    "patch_dpo_fp32_2proc": (("--loss", "patch_dpo"), 2),
    "patch_dpo_bf16_cache_2proc": (("--loss", "patch_dpo", "--mixed_precision", "bf16", "--cache_dir", "{cache}"), 2),
}


def tensor_digests(tensors: list[torch.Tensor]) -> list[str]:
    """One SHA-256 per tensor (dtype, shape, bytes), sorted: independent of the optimizer's parameter order."""
    digests = []
    for tensor in tensors:
        tensor = tensor.detach().cpu().contiguous()
        header = f"{tensor.dtype}:{tuple(tensor.shape)}:".encode()
        digests.append(hashlib.sha256(header + tensor.view(torch.uint8).numpy().tobytes()).hexdigest())
    return sorted(digests)


def first_logged_loss(out: Path) -> str:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    events = EventAccumulator(str(out / "logs" / "patchdpo")).Reload().Scalars("loss")
    first = next(event for event in events if event.step == 1)
    return float(first.value).hex()


def train_argv(models, data: PairData, out: Path, extra: tuple[str, ...], cache: Path, batch: int) -> list[str]:
    return [
        *("--pretrained_model_name_or_path", str(models.sdxl_dir), "--image_encoder_path", str(models.image_encoder_dir)),
        *("--pretrained_ip_adapter_path", str(models.ip_ckpt), "--data_root_path", str(data.root)),
        *("--patch_quality_file", str(data.quality_file), "--resolution", "32", "--train_batch_size", str(batch)),
        *("--learning_rate", "1e-3", "--stop_step", str(STEPS), "--save_steps", str(STEPS), "--logging_steps", "1"),
        *("--noise_offset", "0.05", "--image_drop_rate", "0.2", "--text_drop_rate", "0.2", "--both_drop_rate", "0.2"),
        *("--output_dir", str(out)),
        *(flag.format(cache=cache) for flag in extra),
    ]


@pytest.fixture(scope="module")
def golden_data(tmp_path_factory) -> PairData:
    """Eight 32 px pairs, one reference non-square (its CLIP crop is drawn per step, also with the cache)."""
    root = tmp_path_factory.mktemp("golden_pairs")
    return save_pair_data(root, num_samples=8, image_size=32, latent_size=16, seed=5, reference_sizes={3: (40, 32)})


@pytest.fixture(scope="module")
def observed(tiny_models, golden_data, tmp_path_factory) -> dict:
    """Every run of TRAINING_RUNS and the inference runs, as {name: record}."""
    root = tmp_path_factory.mktemp("golden_runs")
    records = {}
    in_process = {name: extra for name, (extra, processes) in TRAINING_RUNS.items() if processes == 1}
    for name, extra in in_process.items():
        steps: list[list[str]] = []
        hook = register_optimizer_step_post_hook(
            lambda optimizer, *_, steps=steps: steps.append(
                tensor_digests([p for group in optimizer.param_groups for p in group["params"]])
            )
        )
        AcceleratorState._reset_state(reset_partial_state=True)  # each run chooses its own mixed precision
        try:
            out = root / name
            train_patchdpo.main(train_argv(tiny_models, golden_data, out, extra, root / f"cache_{name}", batch=4))
        finally:
            hook.remove()
            AcceleratorState._reset_state(reset_partial_state=True)
        records[name] = {"first_loss": first_logged_loss(out), "adapter_after_step": steps}

    two = {name: extra for name, (extra, processes) in TRAINING_RUNS.items() if processes == 2}
    runs = [
        {"name": name, "argv": train_argv(tiny_models, golden_data, root / name, extra, root / f"cache_{name}", batch=2)}
        for name, extra in two.items()
    ]
    spec = root / "spec.json"
    spec.write_text(json.dumps({"record_dir": str(root / "record"), "runs": runs}))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tests.kit.torchrun_train"]
    done = subprocess.run([*command, str(spec)], cwd=REPO, env=env, capture_output=True, text=True, timeout=900)
    assert done.returncode == 0, done.stderr[-4000:]
    for name in two:
        step_files = sorted((root / "record" / name / "rank0").glob("step*.safetensors"), key=lambda p: int(p.stem[4:]))
        steps = [tensor_digests(list(load_file(str(path)).values())) for path in step_files]
        records[name] = {"first_loss": first_logged_loss(root / name), "adapter_after_step": steps}

    for setting in ("original", "kosmosg"):
        out = root / f"inference_{setting}"
        inference_dreambooth.main(
            [
                *("--base_model_path", str(tiny_models.sdxl_dir), "--image_encoder_path", str(tiny_models.image_encoder_dir)),
                *("--ip_ckpt", str(tiny_models.ip_ckpt), "--data_root", str(DATA_ROOT), "--output_dir", str(out)),
                *("--subjects", "backpack", "cat", "--prompts_per_subject", "2", "--num_inference_steps", "3"),
                *("--height", "32", "--width", "32", "--is_kosmosg", str(setting == "kosmosg")),
            ]
        )
        images = sorted(path for subject in ("backpack", "cat") for path in (out / subject).glob("*.png"))
        assert len(images) == 4, images
        records[f"inference_{setting}"] = {
            str(path.relative_to(out)): hashlib.sha256(np.asarray(Image.open(path).convert("RGB")).tobytes()).hexdigest() for path in images
        }
    return records


def test_the_sdxl_path_is_bit_identical_to_the_recording(observed):
    if RECORD:
        GOLDEN.parent.mkdir(exist_ok=True)
        GOLDEN.write_text(json.dumps(observed, indent=1, sort_keys=True) + "\n")
        pytest.skip(f"recorded {GOLDEN}")
    golden = json.loads(GOLDEN.read_text())
    assert sorted(observed) == sorted(golden)
    differing = [name for name in golden if observed[name] != golden[name]]
    assert not differing, f"these runs no longer reproduce the recording: {differing}"


def test_the_recording_tells_the_runs_apart():
    """Control: every run trained (its weights moved at each step) and the runs differ from each other."""
    golden = json.loads(GOLDEN.read_text())
    training = [golden[name] for name in TRAINING_RUNS]
    assert all(len(record["adapter_after_step"]) == STEPS for record in training)
    assert all(len({tuple(step) for step in record["adapter_after_step"]}) == STEPS for record in training)
    finals = [tuple(record["adapter_after_step"][-1]) for record in training]
    assert len(set(finals)) == len(finals)
    assert golden["inference_original"] != golden["inference_kosmosg"]
