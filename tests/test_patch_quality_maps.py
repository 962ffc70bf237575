"""Quality maps: identical pairs score 1, a pasted foreign region scores low exactly there,
the latent grid is resolution / VAE factor, and the estimate CLI writes and resumes."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

import patch_quality.maps as maps_module
from common.io import sha256_file
from common.run_lock import LOCK_NAME
from patch_quality import layout
from patch_quality.features import PatchFeatureExtractor
from patch_quality.maps import MapSettings, foreground_patch_mask, main, quality_maps
from patch_quality.store import QualityMaps
from stand_ins.vit_models import structured_texture

BACKBONES = ["tiny_dinov2_dir", "tiny_vit_dir", "tiny_clip_vision_dir"]


def _object_on_white(seed: int, size: int = 64) -> Image.Image:
    """A textured object in the middle 32x32 pixels of a white canvas: a clean-background reference."""
    canvas = Image.new("RGB", (size, size), (255, 255, 255))
    canvas.paste(structured_texture(seed, size=size // 2), (size // 4, size // 4))
    return canvas


@pytest.mark.parametrize("backbone", BACKBONES)
@pytest.mark.parametrize("transform", ["raw", "minmax", "threshold"])
def test_identical_images_give_ones(backbone, transform, request):
    extractor = PatchFeatureExtractor.from_pretrained(request.getfixturevalue(backbone), layer=-1)
    image = structured_texture(0)
    reference, generated = extractor([image, image])
    mask = foreground_patch_mask(image, extractor.grid_size)
    assert mask.all()  # no white background in a texture: nothing masked
    ref_map, gen_map = quality_maps(reference, generated, mask, MapSettings(transform=transform, good_threshold=0.9, latent_size=16))
    assert ref_map.shape == gen_map.shape == (16, 16)
    torch.testing.assert_close(ref_map, torch.ones(16, 16), atol=1e-4, rtol=0)
    torch.testing.assert_close(gen_map, torch.ones(16, 16), atol=1e-4, rtol=0)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_pasted_foreign_region_is_low_exactly_there(backbone, request):
    extractor = PatchFeatureExtractor.from_pretrained(request.getfixturevalue(backbone), layer=-1)
    reference_image = structured_texture(0)
    generated_image = reference_image.copy()
    # Foreign 16x16 block over patch rows 1-2, columns 3-4 of the 8x8 grid.
    generated_image.paste(structured_texture(99).crop((0, 0, 16, 16)), (24, 8))
    reference, generated = extractor([reference_image, generated_image])
    latent = 16  # 2 latent cells per patch
    region = torch.zeros(latent, latent, dtype=torch.bool)
    region[2:6, 6:10] = True
    # Away from the region by one patch, bilinear blending of the border cannot reach.
    far = torch.ones(latent, latent, dtype=torch.bool)
    far[0:8, 4:12] = False
    inside = region.clone()
    inside[2, :] = inside[5, :] = inside[:, 6] = inside[:, 9] = False  # interior cells of the region

    raw_ref, raw_gen = quality_maps(reference, generated, None, MapSettings(transform="raw", latent_size=latent))
    for quality in (raw_gen, raw_ref):  # the pasted-over reference content is missing from the generated image too
        assert quality[inside].max() < quality[far].min() - 0.02
        assert quality[far].min() > 0.99
    mm_ref, mm_gen = quality_maps(reference, generated, None, MapSettings(transform="minmax", latent_size=latent))
    assert mm_gen[inside].max() < 0.5 and mm_gen[far].min() > 0.95
    assert mm_gen.argmin() in torch.nonzero(region.flatten()).flatten()
    threshold = (raw_gen[inside].max() + raw_gen[far].min()).item() / 2
    _, th_gen = quality_maps(reference, generated, None, MapSettings(transform="threshold", good_threshold=threshold, latent_size=latent))
    assert th_gen[inside].eq(0).all() and th_gen[far].eq(1).all()
    _, signed_gen = quality_maps(
        reference, generated, None, MapSettings(transform="threshold", good_threshold=threshold, signed=True, latent_size=latent)
    )
    assert signed_gen[inside].eq(-1).all() and signed_gen[far].eq(1).all()


def test_foreground_mask_and_reference_background(tiny_dinov2_dir):
    reference_image = _object_on_white(0)
    mask = foreground_patch_mask(reference_image, 8)
    expected = torch.zeros(8, 8, dtype=torch.bool)
    expected[2:6, 2:6] = True
    assert torch.equal(mask, expected)
    assert foreground_patch_mask(Image.new("RGB", (64, 64), "white"), 8).all()  # nothing to restrict to

    extractor = PatchFeatureExtractor.from_pretrained(tiny_dinov2_dir, layer=-1)
    reference, generated = extractor([reference_image, reference_image])
    ref_map, gen_map = quality_maps(reference, generated, mask, MapSettings(transform="raw", latent_size=8))
    # White generated patches have no white reference patch to match once the max is restricted
    # to the foreground; the object itself still matches perfectly.
    torch.testing.assert_close(gen_map[mask], torch.ones(int(mask.sum())), atol=1e-4, rtol=0)
    assert gen_map[~mask].max() < 0.999
    # The reference background carries no weight: reference_map is 1 there.
    assert ref_map[~mask].eq(1).all()
    _, unmasked_gen = quality_maps(reference, generated, mask, MapSettings(transform="raw", latent_size=8, foreground_mask=False))
    torch.testing.assert_close(unmasked_gen, torch.ones(8, 8), atol=1e-4, rtol=0)


def _make_data(root, count=2, size=128):
    for index in range(count):
        folder = layout.sample_dir(root, index)
        folder.mkdir(parents=True)
        prompt = f"a photo of object {index}"
        reference = _object_on_white(index, size)
        reference.save(layout.reference_path(folder, prompt))
        reference.save(layout.generated_path(folder, prompt, 0))
        structured_texture(50 + index, size).save(layout.generated_path(folder, prompt, 1))


def test_estimate_cli_writes_latent_maps_and_resumes(tmp_path, tiny_dinov2_dir, monkeypatch):
    data = tmp_path / "DATA"
    _make_data(data)
    args = ["--data_root", str(data), "--backbone", str(tiny_dinov2_dir), "--cpu", "--batch_size", "1", "--vae_scale_factor", "8"]

    real_quality_maps = maps_module.quality_maps
    calls = []

    def failing_on_second_sample(reference, generated, mask, settings):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("killed")
        return real_quality_maps(reference, generated, mask, settings)

    monkeypatch.setattr(maps_module, "quality_maps", failing_on_second_sample)
    with pytest.raises(RuntimeError, match="killed"):
        main(args)
    assert not (data / "patch_quality.safetensors").exists()
    assert sorted(p.name for p in (data / maps_module.PARTS_DIR_NAME).iterdir()) == [LOCK_NAME, "sample0.safetensors"]

    calls.clear()
    monkeypatch.setattr(maps_module, "quality_maps", lambda *a: calls.append(1) or real_quality_maps(*a))
    main(args)
    assert len(calls) == 2  # only sample1's two generated images were computed again
    stored = QualityMaps.load(data / "patch_quality.safetensors")
    assert not (data / maps_module.PARTS_DIR_NAME).exists()
    assert stored.keys() == [("sample0", 0), ("sample0", 1), ("sample1", 0), ("sample1", 1)]
    reference_map, generated_map = stored.get("sample0", 0)
    assert reference_map.shape == generated_map.shape == (64, 64)  # 512 / 8
    assert stored[1][1]["gene_map"].shape == (64, 64)
    assert stored.metadata["resolution"] == "512" and stored.metadata["transform"] == "raw"
    assert stored.metadata["layer"] == "2" and stored.metadata["backbone_class"] == "Dinov2Model"
    # gen_0 is the reference itself: its foreground matches perfectly; gen_1 is unrelated.
    assert generated_map[20:44, 20:44].min() > 0.999
    assert stored.get("sample0", 1)[1][20:44, 20:44].mean() < generated_map[20:44, 20:44].mean() - 0.01

    calls.clear()
    main(args + ["--resolution", "256", "--transform", "minmax"])  # other settings: everything recomputed
    assert len(calls) == 4
    assert QualityMaps.load(data / "patch_quality.safetensors").get("sample1", 0)[0].shape == (32, 32)


def test_latent_grid_comes_from_the_model_vae(tmp_path, tiny_dinov2_dir, tiny_sdxl_dir, capsys):
    data = tmp_path / "DATA"
    _make_data(data)
    args = ["--data_root", str(data), "--backbone", str(tiny_dinov2_dir), "--cpu", "--resolution", "64"]
    main([*args, "--base_model_path", str(tiny_sdxl_dir)])
    capsys.readouterr()
    stored = QualityMaps.load(data / "patch_quality.safetensors")
    factor = 2 ** (len(json.loads((tiny_sdxl_dir / "vae" / "config.json").read_text())["block_out_channels"]) - 1)
    assert stored.get("sample0", 0)[0].shape == (64 // factor, 64 // factor) and stored.metadata["vae_scale_factor"] == str(factor)
    for extra, expected in (
        (
            ["--base_model_path", str(tiny_sdxl_dir), "--vae_scale_factor", str(factor * 2)],
            f"contradicts the VAE of --base_model_path {tiny_sdxl_dir}",
        ),
        ([], "pass --base_model_path"),
        (["--base_model_path", str(tmp_path / "no_model")], "no_model"),
    ):
        with pytest.raises(SystemExit) as info:
            main([*args, *extra])
        lines = capsys.readouterr().err.strip().splitlines()
        assert info.value.code == 2 and len(lines) == 1 and expected in lines[0]


def test_cli_errors(tmp_path, tiny_dinov2_dir, capsys):
    with pytest.raises(SystemExit) as info:
        main(["--data_root", str(tmp_path / "absent"), "--backbone", str(tiny_dinov2_dir), "--cpu", "--vae_scale_factor", "8"])
    assert info.value.code == 2 and "data folder not found" in capsys.readouterr().err
    (tmp_path / "sample0").mkdir()
    with pytest.raises(SystemExit):
        main(["--data_root", str(tmp_path), "--backbone", str(tiny_dinov2_dir), "--cpu", "--vae_scale_factor", "8"])
    assert "no reference image" in capsys.readouterr().err
    with pytest.raises(SystemExit) as info:
        main(["--help"])
    assert info.value.code == 0 and "--good_threshold" in capsys.readouterr().out


def test_pixel_mask_uses_background_level():
    image = Image.fromarray(np.full((64, 64, 3), 230, dtype=np.uint8))
    assert foreground_patch_mask(image, 8, background_level=240).all()
    light = Image.fromarray(np.full((64, 64, 3), 250, dtype=np.uint8))
    light_mask = np.asarray(light).copy()
    light_mask[0:8, 0:8] = 0
    mask = foreground_patch_mask(Image.fromarray(light_mask), 8, background_level=240)
    assert mask.sum() == 1 and mask[0, 0]


def test_a_rerun_on_the_same_data_writes_the_same_bytes_bound_to_the_images(tmp_path, tiny_dinov2_dir):
    """Equal maps must be equal files: the training run records the maps file's digest, and a resume refuses another one."""
    data = tmp_path / "DATA"
    _make_data(data)
    args = ["--data_root", str(data), "--backbone", str(tiny_dinov2_dir), "--cpu", "--vae_scale_factor", "8", "--resolution", "64"]
    main(args)
    first = (data / "patch_quality.safetensors").read_bytes()
    main(args)
    assert (data / "patch_quality.safetensors").read_bytes() == first
    sources = QualityMaps.load(data / "patch_quality.safetensors").sources
    _prompt, reference, generated = layout.sample_files(data / "sample1")
    assert sources["sample1"].reference == sha256_file(reference)
    assert dict(sources["sample1"].generated) == {k: sha256_file(path) for k, path in generated.items()}


def test_a_part_of_an_image_changed_since_is_computed_again(tmp_path, tiny_dinov2_dir, monkeypatch):
    data = tmp_path / "DATA"
    _make_data(data)
    args = ["--data_root", str(data), "--backbone", str(tiny_dinov2_dir), "--cpu", "--batch_size", "1", "--vae_scale_factor", "8"]
    real_quality_maps = maps_module.quality_maps
    calls = []

    def failing_on_second_sample(*arguments):
        calls.append(1)
        if len(calls) > 2:
            raise RuntimeError("killed")
        return real_quality_maps(*arguments)

    monkeypatch.setattr(maps_module, "quality_maps", failing_on_second_sample)
    with pytest.raises(RuntimeError, match="killed"):
        main(args)
    changed = layout.sample_files(data / "sample0")[2][1]
    structured_texture(77, 128).save(changed)  # sample0's part exists, computed from the old image
    calls.clear()
    monkeypatch.setattr(maps_module, "quality_maps", lambda *a: calls.append(1) or real_quality_maps(*a))
    main(args)
    assert len(calls) == 4
    assert QualityMaps.load(data / "patch_quality.safetensors").sources["sample0"].generated[1] == sha256_file(changed)
