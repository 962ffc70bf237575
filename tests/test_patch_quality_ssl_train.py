"""Patch-correspondence SSL: the view geometry is right, the loss ranks correct features best,
and training measurably improves top-1 patch matching of a tiny ViT on held-out augmented pairs."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from accelerate import Accelerator
from safetensors import safe_open

from patch_quality.features import PatchFeatureExtractor, transformer_blocks
from patch_quality.ssl_train import (
    FINETUNED_NAME,
    AugmentSettings,
    TrainSettings,
    View,
    correspondence,
    correspondence_info_nce,
    main,
    make_pairs,
    train,
)
from stand_ins.vit_models import structured_texture


def _tensor(image) -> torch.Tensor:
    return torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)


def test_correspondence_identity_flip_and_crop():
    full = View(0, 0, 64, 64, False)
    assert torch.equal(correspondence(full, full, 64, 8), torch.arange(64))
    mirrored = correspondence(full, View(0, 0, 64, 64, True), 64, 8).view(8, 8)
    assert torch.equal(mirrored, torch.arange(64).view(8, 8).flip(-1))
    # View B = left half of the source, magnified x2: source patch column c < 4 lands in B column 2c.
    left_half = View(0, 0, 64, 32, False)
    targets = correspondence(full, left_half, 64, 8).view(8, 8)
    assert (targets[:, 4:] == -1).all()
    assert torch.equal(targets[:, :4] % 8, torch.tensor([0, 2, 4, 6]).expand(8, 4) + 1)


def test_rendered_views_agree_with_the_targets():
    """On a coordinate image (R = x, G = y) the A patch centre and its B target see the same point."""
    size, source = 64, 128
    ramp = (torch.arange(source, dtype=torch.float32) + 0.5) / source
    coordinates = torch.stack([ramp.expand(source, source), ramp[:, None].expand(source, source), torch.zeros(source, source)])
    settings = AugmentSettings(color_jitter=0.0)
    views_a, views_b, targets_ab, _ = make_pairs(coordinates[None].repeat(6, 1, 1, 1), size, 8, settings, torch.Generator().manual_seed(0))
    centers = torch.arange(4, size, 8)
    checked = 0
    for view_a, view_b, targets in zip(views_a, views_b, targets_ab):
        point_a = view_a[:2][:, centers][:, :, centers].reshape(2, -1)
        point_b = view_b[:2][:, centers][:, :, centers].reshape(2, -1)
        valid = targets >= 0
        distance = (point_a[:, valid] - point_b[:, targets[valid]]).abs().amax(dim=0)
        # A target patch is the B patch containing the point: at most half a B patch away (<= 8 source px at 1x crops).
        assert distance.max() <= 8.5 / source
        checked += int(valid.sum())
    assert checked > 100


def test_info_nce_prefers_corresponding_features():
    generator = torch.Generator().manual_seed(0)
    base = torch.nn.functional.normalize(torch.randn(2, 16, 8, generator=generator), dim=-1)
    targets = torch.arange(16).expand(2, 16).clone()
    targets[:, :3] = -1  # some patches fall outside the other view
    aligned = correspondence_info_nce(base, base.clone(), targets, targets, temperature=0.1)
    shuffled = correspondence_info_nce(base, base[:, torch.randperm(16, generator=generator)], targets, targets, temperature=0.1)
    assert aligned < shuffled - 1.0


def test_training_improves_patch_matching(tmp_path, tiny_vit_dir):
    torch.manual_seed(0)
    train_images = [_tensor(structured_texture(seed, size=128)) for seed in range(64)]
    held_out = torch.stack([_tensor(structured_texture(seed, size=128)) for seed in range(1000, 1016)])
    extractor = PatchFeatureExtractor.from_pretrained(tiny_vit_dir, layer=-1)
    before = {name: parameter.detach().clone() for name, parameter in extractor.model.named_parameters()}
    last_block = {id(p) for p in transformer_blocks(extractor.model)[-1].parameters()}
    trained = {name for name, p in extractor.model.named_parameters() if id(p) in last_block}
    settings = TrainSettings(trainable_blocks=1, learning_rate=2e-3, batch_size=8, max_steps=30, seed=0)

    metrics = train(
        Accelerator(cpu=True), extractor, train_images, held_out, settings, AugmentSettings(), tmp_path, tiny_vit_dir, validation_steps=0
    )

    assert metrics["accuracy_after"] > metrics["accuracy_before"] + 0.1, metrics
    # Only the last block moved, and only it is stored.
    for name, parameter in extractor.model.named_parameters():
        assert torch.equal(parameter, before[name]) != (name in trained), name
    checkpoint = tmp_path / FINETUNED_NAME
    with safe_open(str(checkpoint), framework="pt") as handle:
        assert set(handle.keys()) == trained
        assert handle.metadata()["patch_matching_top1_after"] == f"{metrics['accuracy_after']:.4f}"
    assert json.loads((tmp_path / "metrics.json").read_text())["accuracy_after"] == metrics["accuracy_after"]
    # The saved file reproduces the finetuned features on a freshly loaded backbone.
    reloaded = PatchFeatureExtractor.from_pretrained(tiny_vit_dir, layer=-1, finetuned=checkpoint)
    probe = [structured_texture(7)]
    torch.testing.assert_close(reloaded(probe), extractor(probe))


def texture_folder(folder: Path, count: int) -> Path:
    """`count` 96 px textured images, the training data of the CLI runs."""
    folder.mkdir()
    for seed in range(count):
        structured_texture(seed, size=96).save(folder / f"{seed}.png")
    return folder


def ssl_cli_args(backbone: Path, images: Path, out: Path, *extra: str) -> list[str]:
    """A small CPU run: 2 images a step, a third of them held out, one trainable block, a state every 2 steps."""
    return [
        "--backbone",
        str(backbone),
        "--train_data",
        str(images),
        "--output_dir",
        str(out),
        "--cpu",
        "--train_batch_size",
        "2",
        "--validation_fraction",
        "0.34",
        "--validation_steps",
        "0",
        "--trainable_blocks",
        "1",
        "--checkpointing_steps",
        "2",
        "--report_to",
        "",
        *extra,
    ]


def test_cli_checkpoints_and_resumes(tmp_path, tiny_dinov2_dir, capsys):
    images = texture_folder(tmp_path / "images", 6)
    out = tmp_path / "out"
    args = ssl_cli_args(tiny_dinov2_dir, images, out)
    main(args + ["--max_train_steps", "2"])
    assert (out / "checkpoint-2" / "training_state" / FINETUNED_NAME).is_file()
    metrics = main(args + ["--max_train_steps", "3", "--resume_from_checkpoint", "latest"])
    assert metrics["steps"] == 3
    assert (out / FINETUNED_NAME).is_file()
    assert "patch-matching top-1" in capsys.readouterr().out
    with pytest.raises(SystemExit) as info:
        main(["--backbone", str(tiny_dinov2_dir), "--train_data", str(tmp_path / "absent"), "--output_dir", str(out), "--cpu"])
    assert info.value.code == 2 and "training image folder not found" in capsys.readouterr().err
