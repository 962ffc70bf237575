"""Validation during training (dreambench/validation.py): images and scores in TensorBoard, training untouched."""

from __future__ import annotations

import io
import logging
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import torch
from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration
from PIL import Image
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import dreambench.validation
import train_patchdpo
from dreambench.validation import TILE, TrainingValidation
from ip_adapter.checkpoint import load_ip_adapter_checkpoint
from patchdpo.models import TrainingModels, load_training_models
from tests.kit.cli import bad_input_message
from tests.test_train_patchdpo import adapter_state, train_args

REPO = Path(__file__).resolve().parents[1]
DREAMBENCH = REPO.parent / "shared" / "dreambench"
GRID_TAG = "validation/reference_start_current"


def validation_args(tiny_clip_path, tiny_dino_dir, *extra: str) -> list[str]:
    return [
        "--validation_data_root", str(DREAMBENCH), "--validation_subjects", "dog", "--validation_prompts", "2",
        "--validation_steps", "2", "--validation_num_inference_steps", "2", "--validation_size", "32",
        "--clip_model", str(tiny_clip_path), "--dino_model", str(tiny_dino_dir), *extra,
    ]  # fmt: skip


def events(out: Path) -> EventAccumulator:
    return EventAccumulator(str(out / "logs" / "patchdpo"), size_guidance={"images": 0, "scalars": 0}).Reload()


def test_validation_logs_images_and_scores_and_leaves_training_unchanged(
    tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir, tmp_path
):
    common = ("--checkpointing_steps", "4", "--image_drop_rate", "0.3")
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path / "plain", *common, steps=4))
    validated = tmp_path / "validated"
    train_patchdpo.main(
        train_args(tiny_models, tiny_pair_data, validated, *common, *validation_args(tiny_clip_path, tiny_dino_dir), steps=4)
    )

    a, b = adapter_state(tmp_path / "plain", 4), adapter_state(validated, 4)
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)

    logged = events(validated)
    images = logged.Images(GRID_TAG)
    assert [event.step for event in images] == [0, 2, 4]
    assert images[0].width == 3 * 128 and images[0].height == 2 * 128  # reference | start | current, one row per prompt
    grids = [np.asarray(Image.open(io.BytesIO(event.encoded_image_string))) for event in images]
    assert all(np.array_equal(grid[:, 128:256], grids[0][:, 128:256]) for grid in grids)  # the starting adapter column stays
    assert not np.array_equal(grids[-1][:, 256:], grids[0][:, 256:])  # while the current adapter changes
    for metric in ("clipt_score", "clipi_score", "dino_score"):
        values = logged.Scalars(f"validation/{metric}")
        assert [event.step for event in values] == [0, 2, 4] and all(-1.0 <= event.value <= 1.0 for event in values)
    assert GRID_TAG not in events(tmp_path / "plain").Tags()["images"]


def test_validation_flags_are_checked_before_training(tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir, tmp_path):
    argv = train_args(tiny_models, tiny_pair_data, tmp_path / "out", *validation_args(tiny_clip_path, tiny_dino_dir))
    bad_subject = [*argv, "--validation_subjects", "no_such_subject"]
    assert "no_such_subject" in bad_input_message(train_patchdpo.main, bad_subject)
    paper_dino = argv[: argv.index("--dino_model")]  # the other metric model defaults to the paper's: checked at start-up too
    assert "facebook/dino-vits16" in bad_input_message(train_patchdpo.main, paper_dino)


def _run_script(argv: list[str], processes: int = 1) -> None:
    """A fresh interpreter per run: accelerate's state (mixed precision, process group) is per process."""
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "PYTHONPATH": str(REPO), "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", str(processes)]
    result = subprocess.run(
        [*command, str(REPO / "train_patchdpo.py"), *argv], cwd=REPO, env=env, capture_output=True, text=True, timeout=600
    )
    assert result.returncode == 0, result.stderr[-3000:]


def test_validation_in_a_half_precision_run(tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir, tmp_path):
    """bf16 training (the half precision accelerate runs on CPU); validation generates in inference's dtype without dtype errors."""
    out = tmp_path / "out"
    _run_script(
        train_args(tiny_models, tiny_pair_data, out, "--mixed_precision", "bf16", *validation_args(tiny_clip_path, tiny_dino_dir), steps=2)
    )
    assert [event.step for event in events(out).Images(GRID_TAG)] == [0, 2]


def test_two_processes_with_validation(tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir, tmp_path):
    out = tmp_path / "out"
    _run_script(
        train_args(tiny_models, tiny_pair_data, out, *validation_args(tiny_clip_path, tiny_dino_dir), steps=2, batch=1), processes=2
    )
    assert [event.step for event in events(out).Images(GRID_TAG)] == [0, 2]
    assert (out / "checkpoint-2" / "model.bin").is_file()


def test_validation_samples_with_the_training_unet_and_holds_no_second_one(
    tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir, tmp_path, monkeypatch
):
    """The UNet parameters alive while validation samples are those of the one UNet being trained, with --cache_dir too."""
    import gc
    import warnings
    import weakref

    from diffusers import UNet2DConditionModel

    from dreambench.validation import TrainingValidation

    def live_unets() -> list[UNet2DConditionModel]:
        gc.collect()  # a UNet an earlier test left in an uncollected reference cycle is not alive
        with warnings.catch_warnings():  # isinstance on every live object touches deprecated module attributes
            warnings.simplefilter("ignore", FutureWarning)
            return [obj for obj in gc.get_objects() if isinstance(obj, UNet2DConditionModel)]

    held_before_training = weakref.WeakSet(live_unets())  # e.g. held by another test's fixture: not this run's
    real, seen = TrainingValidation._generate, []

    def counting(self):
        unets = [unet for unet in live_unets() if unet not in held_before_training]
        seen.append((len(unets), sum(p.numel() for unet in unets for p in unet.parameters()), self.model.pipe.unet.training))
        return real(self)

    monkeypatch.setattr(TrainingValidation, "_generate", counting)
    extra = ("--cache_dir", str(tmp_path / "cache"), *validation_args(tiny_clip_path, tiny_dino_dir))
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path / "out", *extra, steps=2))
    frozen = sum(p.numel() for p in UNet2DConditionModel.from_pretrained(tiny_models.sdxl_dir, subfolder="unet").parameters())
    adapter = sum(t.numel() for t in load_ip_adapter_checkpoint(tiny_models.ip_ckpt)["ip_adapter"].values())
    assert seen == [(1, frozen + adapter, False)] * 2  # at step 0 and step 2: one UNet, SDXL's + the adapter's parameters


# ----------------------------------------------------------------------------------------------
# Precision: --mixed_precision fp16 imitated on the CPU (accelerate itself runs no fp16 autocast there)

FP16_OVERFLOW_GAIN = 1e6  # decoder.conv_in outputs ~1e6: inf in fp16 (max 65504), finite in fp32 (GroupNorm rescales them)


def _validation_on_cpu(
    tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir, out: Path, weight_dtype: torch.dtype, fp16_autocast: bool, monkeypatch
) -> tuple[TrainingValidation, TrainingModels]:
    """Validation as a run sets it up, with the training models in `weight_dtype`; its VAE overflows in fp16, never in fp32."""
    args = train_patchdpo.parse_args(train_args(tiny_models, tiny_pair_data, out, *validation_args(tiny_clip_path, tiny_dino_dir)))
    accelerator = Accelerator(
        log_with="tensorboard", project_config=ProjectConfiguration(project_dir=str(out), logging_dir=str(out / "logs"))
    )
    if fp16_autocast:  # what accelerator.autocast() is in an fp16 run on a GPU
        monkeypatch.setattr(accelerator, "autocast", lambda: torch.autocast("cpu", dtype=torch.float16))
    models = load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", weight_dtype)
    conv_in = models.encoders.vae.decoder.conv_in
    with torch.no_grad():
        conv_in.weight.mul_(FP16_OVERFLOW_GAIN)
        conv_in.bias.mul_(FP16_OVERFLOW_GAIN)
    return TrainingValidation(train_patchdpo.validation_settings(args), accelerator, args.seed, models), models


def test_fp16_validation_decodes_in_float32_and_matches_float32_validation(
    tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir, tmp_path, monkeypatch
):
    """An fp16 run (fp16 weights under fp16 autocast) with a VAE that overflows in fp16 draws the fp32 run's images."""
    make = (tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir)
    fp16, models = _validation_on_cpu(*make, tmp_path / "fp16", torch.float16, True, monkeypatch)
    fp32, _ = _validation_on_cpu(*make, tmp_path / "fp32", torch.float32, False, monkeypatch)
    latent = torch.randn(1, 4, 16, 16)
    with torch.no_grad(), torch.autocast("cpu", dtype=torch.float16):  # the stand-in is one the old validation drew black
        assert not models.encoders.vae.decode(latent).sample.isfinite().all()

    half, full = fp16._generate(), fp32._generate()
    assert all(image is not None for image in half)
    for a, b in zip(half, full):
        difference = np.abs(np.asarray(a, dtype=int) - np.asarray(b, dtype=int))
        assert np.asarray(a).std() > 20 and difference.mean() < 1 and difference.max() <= 8  # fp16 rounding of the denoising only


def test_a_non_finite_validation_image_is_named_in_a_warning_drawn_as_a_marked_tile_and_not_scored(
    tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir, tmp_path, monkeypatch, caplog
):
    out = tmp_path / "out"
    validation, models = _validation_on_cpu(
        tiny_models, tiny_pair_data, tiny_clip_path, tiny_dino_dir, out, torch.float32, False, monkeypatch
    )
    real = dreambench.validation.generate_batch

    def second_latent_nan(*args, **kwargs):
        latents = real(*args, **kwargs).clone()
        latents[1] = float("nan")
        return latents

    monkeypatch.setattr(dreambench.validation, "generate_batch", second_latent_nan)
    validation.accelerator.init_trackers("patchdpo")
    with caplog.at_level(logging.WARNING, logger="dreambench.validation"):
        validation(3, models.model.adapter_modules)
    validation.accelerator.end_training()

    first, second = (item.prompt for item in validation.items)
    warning = " ".join(record.getMessage() for record in caplog.records)
    assert "step 3" in warning and f"dog: {second!r}" in warning and first not in warning
    grid = np.asarray(Image.open(io.BytesIO(events(out).Images(GRID_TAG)[0].encoded_image_string)))
    marked = grid[TILE:, 2 * TILE :]  # second row, current adapter
    assert np.mean(np.all(marked == (96, 96, 96), axis=-1)) > 0.8  # the grey non-finite tile, not a black square
    assert np.asarray(grid[:TILE, 2 * TILE :]).std() > 20  # the finite image is drawn
    assert not [tag for tag in events(out).Tags()["scalars"] if tag.startswith("validation/")]  # the step is not scored
