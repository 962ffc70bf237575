"""Generation calls carry their own IP-Adapter scale, and a bug deep in generation is not bad input."""

from __future__ import annotations

import traceback

import numpy as np
import pytest
import torch
import torch._dynamo.testing
from PIL import Image

import inference_dreambooth
from base_models.generation import load_generation_model
from dreambench.data import load_conditioning_images
from dreambench.generation import build_items
from ip_adapter import IPAdapterPlusXL, IPAttnProcessor, set_ip_adapter_scale
from ip_adapter.batch_generation import SubjectTokens, generate_batch
from stand_ins.sdxl import load_pipeline
from tests.kit.dreambench import DREAMBENCH_ROOT

SIZE, STEPS = 32, 2


def _reference() -> Image.Image:
    return Image.fromarray(np.random.default_rng(0).integers(0, 256, size=(48, 48, 3), dtype=np.uint8))


def _pixels(images: list[Image.Image]) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def _fresh(tiny_models) -> IPAdapterPlusXL:
    return IPAdapterPlusXL(load_pipeline(tiny_models.sdxl_dir), tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu")


@pytest.mark.parametrize("scale", [1.0, 0.6])
def test_a_call_at_scale_s_after_a_call_at_0_3_equals_a_fresh_models_call_at_s(tiny_models, scale):
    kwargs = dict(num_samples=1, seed=5, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    used = _fresh(tiny_models)
    at_0_3 = used.generate(_reference(), scale=0.3, **kwargs)
    default = {} if scale == 1.0 else {"scale": scale}  # 1.0: the official default of `generate`
    after = _pixels(used.generate(_reference(), **default, **kwargs))
    assert np.array_equal(after, _pixels(_fresh(tiny_models).generate(_reference(), **default, **kwargs)))
    assert np.abs(after - _pixels(at_0_3)).max() > 2  # the scale matters, so the check above can fail


def test_a_new_scale_needs_no_recompile_and_matches_eager():
    """The scale is a runtime input of the processors: a compiled model traces once for every scale."""
    from diffusers.models.attention_processor import Attention

    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=48, heads=4, dim_head=16).eval()
    attn.set_processor(IPAttnProcessor(hidden_size=64, cross_attention_dim=48, num_tokens=16))
    hidden, context = torch.randn(2, 16, 64), torch.randn(2, 11 + 16, 48)
    frames = torch._dynamo.testing.CompileCounter()
    compiled = torch.compile(attn, backend=frames)
    outputs = []
    for scale in (1.0, 0.3, 0.7):
        set_ip_adapter_scale(attn, scale)
        with torch.no_grad():
            outputs.append(compiled(hidden, encoder_hidden_states=context))
            assert torch.equal(outputs[-1], attn(hidden, encoder_hidden_states=context))
    assert frames.frame_count == 1
    assert not torch.allclose(outputs[0], outputs[1])


def test_generate_from_tokens_and_generate_batch_take_the_scale_of_the_call(tiny_models):
    model = load_generation_model(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.float32)
    tokens = SubjectTokens(model, lambda subject: load_conditioning_images(DREAMBENCH_ROOT, subject, kosmosg=False))
    items = build_items({"backpack": ["a photo in the snow"]}, seed=42)
    common = dict(height=SIZE, width=SIZE)
    first = _pixels(generate_batch(model, tokens, items, STEPS, scale=0.7, **common))
    at_0_3 = _pixels(generate_batch(model, tokens, items, STEPS, scale=0.3, **common))
    again = _pixels(generate_batch(model, tokens, items, STEPS, scale=0.7, **common))
    assert np.array_equal(first, again) and np.abs(first - at_0_3).max() > 2
    with pytest.raises(TypeError, match="scale"):
        model.generate_from_tokens(*tokens("backpack"), ["a photo"], ["blurry"], None, STEPS, **common)


def test_an_internal_value_error_deep_in_generation_keeps_its_traceback(tiny_models, tmp_path, monkeypatch):
    """A bug is not bad input: `main` must not turn it into a one-line exit 2."""

    def broken_attention(self, *args, **kwargs):
        raise ValueError("injected internal bug")

    # Inside the UNet, inside the diffusers pipeline, inside the batch loop: as deep as generation goes.
    monkeypatch.setattr(IPAttnProcessor, "_attend", broken_attention)
    argv = [
        "--base_model_path",
        str(tiny_models.sdxl_dir),
        "--image_encoder_path",
        str(tiny_models.image_encoder_dir),
        "--ip_ckpt",
        str(tiny_models.ip_ckpt),
        "--data_root",
        str(DREAMBENCH_ROOT),
        "--output_dir",
        str(tmp_path / "out"),
        "--subjects",
        "backpack",
        "--prompts_per_subject",
        "1",
        "--num_inference_steps",
        "1",
        "--height",
        str(SIZE),
        "--width",
        str(SIZE),
    ]
    with pytest.raises(ValueError, match="injected internal bug") as raised:
        inference_dreambooth.main(argv)
    frames = [frame.name for frame in traceback.extract_tb(raised.tb)]
    assert {"main", "run", "generate_batch", "generate_from_tokens"} <= set(frames) and frames[-1] == "broken_attention"
