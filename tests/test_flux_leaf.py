"""FLUX leaf modules: the tiny FLUX.1-dev stand-ins, XLabs' adapter file, our adapter in diffusers, FLUX latents."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from diffusers import FluxPipeline, FluxTransformer2DModel
from PIL import Image
from safetensors.torch import load_file, save_file
from transformers import CLIPImageProcessor, CLIPVisionModelWithProjection, T5TokenizerFast

from base_models.flux_latents import (
    denormalize_latents,
    latent_image_ids,
    normalize_latents,
    pack_latents,
    pack_patch_weights,
    unpack_latents,
)
from common.errors import BadInputError
from common.io import sha256_file
from ip_adapter.flux_ip_adapter import (
    adapter_parameters,
    fresh_flux_ip_adapter,
    install_flux_ip_adapter,
    ip_adapter_kwargs,
    load_flux_ip_adapter,
    save_flux_ip_adapter,
    set_flux_ip_adapter_scale,
)
from ip_adapter.xlabs import read_xlabs_file
from stand_ins.flux import FULL, TINY, build_t5_tokenizer, meta_transformer, xlabs_state
from tests.kit.flux import *  # noqa: F401,F403

PROMPT = "a photo of a dog on the beach"
#: Our pipeline and diffusers' run the same modules in float32 on the same inputs: they must agree to rounding.
IMAGE_TOLERANCE = 1e-6


def load_pipeline(flux_dir, image_encoder_dir=None) -> FluxPipeline:
    extra = {}
    if image_encoder_dir is not None:
        extra = dict(
            image_encoder=CLIPVisionModelWithProjection.from_pretrained(str(image_encoder_dir)),
            feature_extractor=CLIPImageProcessor.from_pretrained(str(image_encoder_dir)),
        )
    return FluxPipeline.from_pretrained(str(flux_dir), local_files_only=True, **extra)


def load_transformer(flux_dir) -> FluxTransformer2DModel:
    return FluxTransformer2DModel.from_pretrained(str(flux_dir), subfolder="transformer", local_files_only=True)


def generate(pipe: FluxPipeline, image: Image.Image | None = None) -> np.ndarray:
    kwargs = dict(ip_adapter_image=image) if image is not None else {}
    generator = torch.Generator().manual_seed(0)
    return pipe(PROMPT, height=64, width=64, num_inference_steps=2, generator=generator, output_type="np", **kwargs).images


def reference_image() -> Image.Image:
    return Image.fromarray((np.random.RandomState(0).rand(64, 64, 3) * 255).astype(np.uint8))


# --- stand-ins -------------------------------------------------------------------------------------------------------


def test_tiny_flux_folder_has_flux_dev_layout(tiny_flux_dir):
    index = json.loads((tiny_flux_dir / "model_index.json").read_text())
    assert index["_class_name"] == "FluxPipeline"
    assert index["text_encoder_2"] == ["transformers", "T5EncoderModel"] and index["tokenizer_2"][1].startswith("T5Tokenizer")
    transformer = json.loads((tiny_flux_dir / "transformer" / "config.json").read_text())
    vae = json.loads((tiny_flux_dir / "vae" / "config.json").read_text())
    assert transformer["guidance_embeds"] and transformer["in_channels"] == 4 * vae["latent_channels"]
    assert (vae["shift_factor"], vae["scaling_factor"]) == (0.1159, 0.3611) and len(vae["block_out_channels"]) == 4
    assert json.loads((tiny_flux_dir / "scheduler" / "scheduler_config.json").read_text())["use_dynamic_shifting"]


def test_t5_tokenizer_is_made_offline_and_deterministic(tiny_flux_dir):
    first, second = build_t5_tokenizer(), build_t5_tokenizer()
    assert first.get_vocab() == second.get_vocab()
    saved = T5TokenizerFast.from_pretrained(str(tiny_flux_dir / "tokenizer_2"))
    ids = saved(PROMPT).input_ids
    assert ids == first(PROMPT).input_ids and ids[-1] == saved.eos_token_id and saved.unk_token_id not in ids


def test_full_configs_have_flux_dev_sizes():
    transformer = meta_transformer(FULL)
    assert sum(p.numel() for p in transformer.parameters()) == pytest.approx(11.9e9, rel=0.005)
    install_flux_ip_adapter(transformer, image_embed_dim=FULL.image_encoder["projection_dim"])
    adapter = adapter_parameters(transformer)
    assert sum(p.numel() for p in adapter.values()) == pytest.approx(0.49e9, rel=0.02)
    assert adapter["encoder_hid_proj.image_projection_layers.0.image_embeds.weight"].shape == (4 * 4096, 768)
    assert adapter["transformer_blocks.18.attn.processor.to_k_ip.0.weight"].shape == (3072, 4096)


# --- the XLabs file and diffusers ------------------------------------------------------------------------------------


def test_our_checkpoint_loads_in_diffusers_and_gives_our_images(tiny_flux_models, tmp_path):
    image = reference_image()
    ours = load_pipeline(tiny_flux_models.flux_dir, tiny_flux_models.image_encoder_dir)
    load_flux_ip_adapter(ours.transformer, tiny_flux_models.ip_ckpt)
    with torch.no_grad():  # as after training: the weights are no longer the file's
        for parameter in adapter_parameters(ours.transformer).values():
            parameter.add_(0.1 * torch.randn(parameter.shape, generator=torch.Generator().manual_seed(parameter.numel())))
    ckpt = save_flux_ip_adapter(tmp_path / "ip_adapter.safetensors", ours.transformer)
    our_images = generate(ours, image)
    set_flux_ip_adapter_scale(ours.transformer, 0.0)
    assert np.abs(generate(ours, image) - our_images).max() > 0.05  # the image prompt acts: the comparison can fail

    theirs = load_pipeline(tiny_flux_models.flux_dir)
    theirs.load_ip_adapter(
        str(ckpt.parent),
        weight_name=ckpt.name,
        image_encoder_pretrained_model_name_or_path=str(tiny_flux_models.image_encoder_dir),
        image_encoder_dtype=torch.float32,
        local_files_only=True,
    )
    assert np.abs(generate(theirs, image) - our_images).max() <= IMAGE_TOLERANCE  # measured: 0.0


def test_public_xlabs_layout_loads_where_diffusers_puts_it(tiny_flux_dir, tmp_path):
    state = xlabs_state(TINY)
    public = {  # written by safetensors itself, not by our writer, under the literal names of XLabs' file
        "ip_adapter_proj_model.proj.weight": state["ip_adapter_proj_model.proj.weight"],
        "ip_adapter_proj_model.proj.bias": state["ip_adapter_proj_model.proj.bias"],
        "ip_adapter_proj_model.norm.weight": state["ip_adapter_proj_model.norm.weight"],
        "ip_adapter_proj_model.norm.bias": state["ip_adapter_proj_model.norm.bias"],
    }
    for block in (0, 1):
        for kv in ("k", "v"):
            for kind in ("weight", "bias"):
                key = f"double_blocks.{block}.processor.ip_adapter_double_stream_{kv}_proj.{kind}"
                public[key] = state[key]
    save_file(public, str(tmp_path / "ip_adapter.safetensors"))
    ours = load_transformer(tiny_flux_dir)
    load_flux_ip_adapter(ours, tmp_path / "ip_adapter.safetensors")
    theirs = load_pipeline(tiny_flux_dir)
    theirs.load_ip_adapter(str(tmp_path), weight_name="ip_adapter.safetensors", image_encoder_pretrained_model_name_or_path=None)
    assert ours.state_dict().keys() == theirs.transformer.state_dict().keys()
    for name, tensor in theirs.transformer.state_dict().items():
        assert torch.equal(ours.state_dict()[name], tensor), name
    processor = ours.transformer_blocks[1].attn.processor
    assert torch.equal(processor.to_v_ip[0].bias, public["double_blocks.1.processor.ip_adapter_double_stream_v_proj.bias"])


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_save_load_round_trip_is_bit_identical(tiny_flux_dir, tiny_xlabs_ckpt, tmp_path, dtype):
    transformer = load_transformer(tiny_flux_dir)
    load_flux_ip_adapter(transformer, tiny_xlabs_ckpt)
    first = save_flux_ip_adapter(tmp_path / "first.safetensors", transformer, dtype=dtype)
    reloaded = load_transformer(tiny_flux_dir).to(dtype)
    load_flux_ip_adapter(reloaded, first)
    second = save_flux_ip_adapter(tmp_path / "second.safetensors", reloaded)
    assert sha256_file(first) == sha256_file(second)
    written = load_file(str(second))
    assert all(tensor.dtype == dtype for tensor in written.values())
    if dtype == torch.float32:
        assert sha256_file(first) == sha256_file(tiny_xlabs_ckpt)
        assert all(torch.equal(written[key], tensor) for key, tensor in read_xlabs_file(tiny_xlabs_ckpt).items())


def test_fresh_adapter_starts_at_the_base_model(tiny_flux_dir):
    transformer = load_transformer(tiny_flux_dir)
    inputs = dict(
        hidden_states=torch.randn(2, 16, 16),
        encoder_hidden_states=torch.randn(2, 5, 32),
        pooled_projections=torch.randn(2, 32),
        timestep=torch.tensor([0.3, 0.7]),
        guidance=torch.tensor([3.5, 3.5]),
        img_ids=latent_image_ids(8, 8),
        txt_ids=torch.zeros(5, 3),
    )
    base = transformer(**inputs).sample
    fresh_flux_ip_adapter(transformer, image_embed_dim=16, seed=7)
    image_embeds = torch.randn(2, 16)
    out = transformer(**inputs, joint_attention_kwargs=ip_adapter_kwargs(image_embeds)).sample
    assert torch.equal(out, base)
    out.square().mean().backward()
    grads = {name: p.grad for name, p in adapter_parameters(transformer).items()}
    assert grads["transformer_blocks.0.attn.processor.to_v_ip.0.weight"].abs().sum() > 0
    assert grads["encoder_hid_proj.image_projection_layers.0.image_embeds.weight"].abs().sum() == 0  # behind zero k/v
    projection = transformer.encoder_hid_proj.image_projection_layers[0].image_embeds.weight.detach().clone()
    again = load_transformer(tiny_flux_dir)
    fresh_flux_ip_adapter(again, image_embed_dim=16, seed=7)
    assert torch.equal(again.encoder_hid_proj.image_projection_layers[0].image_embeds.weight, projection)
    fresh_flux_ip_adapter(again, image_embed_dim=16, seed=8)
    assert not torch.equal(again.encoder_hid_proj.image_projection_layers[0].image_embeds.weight, projection)


def _write_state(path, state):
    save_file({key: tensor.contiguous() for key, tensor in state.items()}, str(path))
    return path


@pytest.mark.parametrize(
    "change, message",
    [
        (lambda s: s.pop("double_blocks.1.processor.ip_adapter_double_stream_k_proj.bias"), "missing key"),
        (lambda s: s.update({"image_proj.proj.weight": torch.ones(1)}), "unexpected key 'image_proj.proj.weight'"),
        (lambda s: s["ip_adapter_proj_model.norm.bias"].__setitem__(0, float("nan")), "NaN/inf"),
        (lambda s: [tensor.zero_() for tensor in s.values()], "every tensor is zero"),
        (lambda s: [s.pop(k) for k in list(s) if k.startswith("double_blocks.1.")], "for 1 double blocks, this FLUX transformer has 2"),
        (
            lambda s: s.update({"ip_adapter_proj_model.norm.weight": torch.ones(7), "ip_adapter_proj_model.norm.bias": torch.ones(7)}),
            "shape",
        ),
    ],
)
def test_a_bad_adapter_file_is_one_line_naming_it(tiny_flux_dir, tmp_path, change, message):
    state = xlabs_state(TINY)
    change(state)
    path = _write_state(tmp_path / "bad.safetensors", state)
    with pytest.raises(BadInputError, match=message) as error:
        load_flux_ip_adapter(load_transformer(tiny_flux_dir), path)
    assert str(path) in str(error.value) and "\n" not in str(error.value)


# --- latents ---------------------------------------------------------------------------------------------------------


def test_packing_is_the_pipelines():
    latents = torch.randn(3, 4, 6, 8)
    packed = pack_latents(latents)
    assert torch.equal(packed, FluxPipeline._pack_latents(latents, 3, 4, 6, 8))
    assert torch.equal(unpack_latents(packed, 6, 8), latents)
    assert torch.equal(FluxPipeline._unpack_latents(packed, 6 * 8, 8 * 8, 8), latents)
    assert torch.equal(latent_image_ids(6, 8), FluxPipeline._prepare_latent_image_ids(1, 3, 4, "cpu", torch.float32))
    with pytest.raises(ValueError, match="even sides"):
        pack_latents(torch.randn(1, 4, 5, 8))


def test_normalisation_is_inverted_by_what_the_pipeline_decodes():
    z = torch.randn(2, 4, 8, 8)
    x = normalize_latents(z, 0.1159, 0.3611)
    assert torch.allclose(x, (z - 0.1159) * 0.3611) and torch.allclose(denormalize_latents(x, 0.1159, 0.3611), z, atol=1e-6)


def test_each_patch_weight_lands_on_its_own_position():
    """Mutation test: a weight set at one latent position shows up exactly on that position's C features of its token."""
    channels, height, width = 3, 4, 6
    for row in range(height):
        for col in range(width):
            weights = torch.zeros(1, 1, height, width)
            weights[0, 0, row, col] = 1.0
            packed = pack_patch_weights(weights, channels)
            token = (row // 2) * (width // 2) + col // 2
            features = [c * 4 + (row % 2) * 2 + col % 2 for c in range(channels)]
            expected = torch.zeros_like(packed)
            expected[0, token, features] = 1.0
            assert torch.equal(packed, expected), (row, col)


def test_weighted_loss_is_the_same_packed_or_unpacked():
    pred, target, weights = torch.randn(2, 4, 6, 8), torch.randn(2, 4, 6, 8), torch.rand(2, 1, 6, 8)
    unpacked = (weights * (pred - target).square()).mean()
    packed = (pack_patch_weights(weights, 4) * (pack_latents(pred) - pack_latents(target)).square()).mean()
    assert torch.allclose(packed, unpacked, rtol=1e-6)
