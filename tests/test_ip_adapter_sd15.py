"""IP-Adapter-Plus on SD 1.5: the public `ip-adapter-plus_sd15.bin` layout, and our checkpoints in diffusers."""

from __future__ import annotations

import json

import pytest
import torch
from diffusers import UNet2DConditionModel

from ip_adapter import IPAdapterPlus, IPAdapterPlusXL, install_ip_adapter, load_ip_adapter_checkpoint
from stand_ins.components import build_resampler
from stand_ins.sd15 import FULL, load_pipeline


def test_full_shape_has_the_public_sd15_plus_keys_and_shapes() -> None:
    """h94/IP-Adapter/models/ip-adapter-plus_sd15.bin: 16 cross-attention layers 1, 3, ..., 31 of 320/640/1280
    channels reading 768-wide tokens; a Resampler of dim 768 from ViT-H's 1280 features to 768."""
    with torch.device("meta"):
        adapter = install_ip_adapter(UNet2DConditionModel(**FULL.unet)).state_dict()
        resampler = build_resampler(FULL).state_dict()
    # down 2+2+2 layers, mid 1, up 3+3+3: in attn_processors order (down, up, mid).
    order = [320, 320, 640, 640, 1280, 1280] + [1280] * 3 + [640] * 3 + [320] * 3 + [1280]
    expected = {f"{2 * i + 1}.to_{kv}_ip.weight": (width, 768) for i, width in enumerate(order) for kv in "kv"}
    assert {key: tuple(value.shape) for key, value in adapter.items()} == expected
    assert len(expected) == 32
    assert resampler["latents"].shape == (1, 16, 768)
    assert resampler["proj_in.weight"].shape == (768, 1280)
    assert resampler["proj_out.weight"].shape == (768, 768)
    assert resampler["layers.3.0.to_kv.weight"].shape == (1536, 768)
    assert resampler["layers.3.1.1.weight"].shape == (3072, 768)
    assert not any(key.startswith("layers.4.") for key in resampler)


def test_tiny_stand_in_is_an_sd15_folder_with_an_h94_layout_checkpoint(tiny_sd15_models) -> None:
    index = json.loads((tiny_sd15_models.sd15_dir / "model_index.json").read_text())
    assert index["_class_name"] == "StableDiffusionPipeline" and "text_encoder_2" not in index
    assert tiny_sd15_models.image_encoder_dir.parts[-2:] == ("models", "image_encoder")
    assert tiny_sd15_models.ip_ckpt.name == "ip-adapter-plus_sd15.bin"
    checkpoint = load_ip_adapter_checkpoint(tiny_sd15_models.ip_ckpt)
    unet = load_pipeline(tiny_sd15_models.sd15_dir).unet
    assert unet.config.addition_embed_type is None
    assert checkpoint["ip_adapter"].keys() == install_ip_adapter(unet).state_dict().keys()
    assert checkpoint["image_proj"]["proj_out.weight"].shape[0] == unet.config.cross_attention_dim


def test_each_wrapper_takes_its_own_pipeline_only(tiny_models, tiny_sd15_models) -> None:
    from stand_ins.sdxl import load_pipeline as load_sdxl_pipeline

    with pytest.raises(TypeError, match="IPAdapterPlus needs a diffusers StableDiffusionPipeline, got StableDiffusionXLPipeline"):
        IPAdapterPlus(load_sdxl_pipeline(tiny_models.sdxl_dir), tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu")
    with pytest.raises(TypeError, match="IPAdapterPlusXL needs a diffusers StableDiffusionXLPipeline, got StableDiffusionPipeline"):
        IPAdapterPlusXL(load_pipeline(tiny_sd15_models.sd15_dir), tiny_sd15_models.image_encoder_dir, tiny_sd15_models.ip_ckpt, "cpu")
