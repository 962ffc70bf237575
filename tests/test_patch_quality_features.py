"""Patch features from local ViT-family backbones: shapes, token bookkeeping, finetune files."""

from __future__ import annotations

import json
import shutil

import numpy as np
import pytest
import torch
from PIL import Image
from transformers.image_utils import IMAGENET_DEFAULT_MEAN

from common.errors import BadInputError
from patch_quality.features import PatchFeatureExtractor, load_finetuned, save_finetuned, transformer_blocks
from stand_ins.vit_models import TINY_IMAGE_SIZE, TINY_PATCH_SIZE, save_tiny_vit, structured_texture

BACKBONES = ["tiny_dinov2_dir", "tiny_dinov2_registers_dir", "tiny_vit_dir", "tiny_clip_vision_dir"]
GRID = TINY_IMAGE_SIZE // TINY_PATCH_SIZE


@pytest.mark.parametrize("backbone", BACKBONES)
def test_grid_shape_norm_and_patch_locality(backbone, request):
    """Layer 0 (embeddings) is per-patch, so a change inside patch (2, 5) must move only cell (2, 5):
    this fails if class/register tokens were kept or the grid were transposed."""
    backbone_dir = request.getfixturevalue(backbone)
    extractor = PatchFeatureExtractor.from_pretrained(backbone_dir, layer=0)
    assert extractor.image_size == TINY_IMAGE_SIZE  # read from preprocessor_config.json
    image = structured_texture(0)
    array = np.asarray(image).copy()
    row, col = 2, 5
    array[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8] = 255 - array[row * 8 : row * 8 + 8, col * 8 : col * 8 + 8]
    features = extractor([image, Image.fromarray(array)])
    assert features.shape == (2, GRID, GRID, 32)
    torch.testing.assert_close(features.norm(dim=-1), torch.ones(2, GRID, GRID))
    changed = (features[0] - features[1]).abs().amax(dim=-1) > 1e-4
    expected = torch.zeros(GRID, GRID, dtype=torch.bool)
    expected[row, col] = True
    assert torch.equal(changed, expected)


@pytest.mark.parametrize("backbone", BACKBONES)
def test_last_layer_other_sizes_and_square_crop(backbone, request):
    backbone_dir = request.getfixturevalue(backbone)
    last = PatchFeatureExtractor.from_pretrained(backbone_dir, layer=-1)
    assert last.layer == 2
    torch.testing.assert_close(
        last([structured_texture(1)]), PatchFeatureExtractor.from_pretrained(backbone_dir, layer=2)([structured_texture(1)])
    )
    larger = PatchFeatureExtractor.from_pretrained(backbone_dir, layer=1, image_size=96)
    assert larger([structured_texture(1)]).shape == (1, 12, 12, 32)
    # A non-square image is read as its centred square, the region training keeps.
    wide = structured_texture(2, size=96)
    square = wide.crop((16, 16, 80, 80))
    padded = Image.new("RGB", (96, 64))
    padded.paste(square, (16, 0))
    torch.testing.assert_close(last([padded]), last([square]))


def test_defaults_without_image_processor_config(tmp_path, tiny_vit_dir):
    bare = tmp_path / "bare"
    shutil.copytree(tiny_vit_dir, bare)
    (bare / "preprocessor_config.json").unlink()
    extractor = PatchFeatureExtractor.from_pretrained(bare)
    assert extractor.image_size == TINY_IMAGE_SIZE  # config.image_size
    torch.testing.assert_close(extractor.image_mean.flatten(), torch.tensor(IMAGENET_DEFAULT_MEAN))
    torch.testing.assert_close(
        extractor([structured_texture(0)]), PatchFeatureExtractor.from_pretrained(tiny_vit_dir)([structured_texture(0)])
    )


def test_one_line_errors(tmp_path, tiny_vit_dir):
    with pytest.raises(BadInputError, match="config.json"):
        PatchFeatureExtractor.from_pretrained(tmp_path)
    with pytest.raises(ValueError, match="layer 5 is out of range"):
        PatchFeatureExtractor.from_pretrained(tiny_vit_dir, layer=5)
    with pytest.raises(ValueError, match="not a multiple of the backbone patch size"):
        PatchFeatureExtractor.from_pretrained(tiny_vit_dir, image_size=60)
    (tmp_path / "config.json").write_text(json.dumps({"model_type": "bert"}))
    with pytest.raises(ValueError, match="model_type 'bert'"):
        PatchFeatureExtractor.from_pretrained(tmp_path)


def test_finetuned_checkpoint_round_trip_and_backbone_check(tmp_path, tiny_dinov2_dir):
    extractor = PatchFeatureExtractor.from_pretrained(tiny_dinov2_dir, layer=-1)
    before = extractor([structured_texture(3)])
    block = transformer_blocks(extractor.model)[-1]
    with torch.no_grad():
        for parameter in block.parameters():
            parameter.add_(0.1 * torch.randn_like(parameter))
    last_block = {id(p) for p in block.parameters()}
    names = [name for name, p in extractor.model.named_parameters() if id(p) in last_block]
    checkpoint = tmp_path / "ssl.safetensors"
    save_finetuned(checkpoint, extractor.model, names, tiny_dinov2_dir, {"layer": "2", "trained_blocks": "1"})
    after = extractor([structured_texture(3)])
    assert not torch.allclose(before, after)

    reloaded = PatchFeatureExtractor.from_pretrained(tiny_dinov2_dir, layer=-1, finetuned=checkpoint)
    torch.testing.assert_close(reloaded([structured_texture(3)]), after)

    with pytest.raises(ValueError, match="trained for the features of layer 2, not layer 1"):
        PatchFeatureExtractor.from_pretrained(tiny_dinov2_dir, layer=1, finetuned=checkpoint)
    other = save_tiny_vit(tmp_path / "other_vit")
    with pytest.raises(ValueError, match="different backbone"):
        PatchFeatureExtractor.from_pretrained(other, finetuned=checkpoint)
    with pytest.raises(BadInputError, match="not found"):
        load_finetuned(extractor.model, tmp_path / "absent.safetensors", tiny_dinov2_dir)
