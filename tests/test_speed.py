"""GPU-side speed settings, checked on CPU with the tiny models: `--compile`, channels-last, TF32, SDPA, VAE dtype.

Runtime (2 shared cores, cold inductor cache): the inductor-compiled inference test ~70 s, the
compiled training test ~25 s (`aot_eager`; ~4 min with inductor, which `PATCHDPO_SLOW_TESTS=1`
selects), everything else a few seconds.
"""

from __future__ import annotations

import inspect
import os

import numpy as np
import pytest
import torch
from diffusers.models.attention_processor import AttnProcessor2_0
from PIL import Image
from torch._dynamo.utils import counters
from torch.utils.data import default_collate

import inference_dreambooth
import train_patchdpo
from base_models.generation import load_generation_model
from ip_adapter import IPAttnProcessor, attention_processor, resampler, set_ip_adapter_scale
from ip_adapter.batch_generation import GenerationItem, SubjectTokens, generate_batch
from ip_adapter.speed import apply_speed_settings, speed_up_unet
from patch_quality.store import QualityMaps
from patchdpo.method import EncodedPairs, Method, training_step
from patchdpo.models import load_training_models
from patchdpo.pair_dataset import DropoutRates, EncoderInputs, PairDataset, index_pairs
from tests.test_inference_dreambooth import script_args as inference_args
from tests.test_train_patchdpo import train_args

SIZE, STEPS = 32, 2
TRAIN_BACKEND = "inductor" if os.environ.get("PATCHDPO_SLOW_TESTS") else "aot_eager"


def _image(seed: int) -> Image.Image:
    return Image.fromarray(np.random.default_rng(seed).integers(0, 256, size=(64, 64, 3), dtype=np.uint8))


def _compiled_graphs() -> int:
    return counters["stats"]["unique_graphs"]


def _max_pixel_difference(first: list[Image.Image], second: list[Image.Image]) -> int:
    return max(int(np.abs(np.asarray(a, dtype=np.int16) - np.asarray(b, dtype=np.int16)).max()) for a, b in zip(first, second, strict=True))


@pytest.fixture()
def generator(tiny_models):
    ip_model = load_generation_model(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.float32)
    references = {"cat": [_image(0)], "dog": [_image(1), _image(2)], "toy": [_image(3)]}
    return ip_model, SubjectTokens(ip_model, references.__getitem__)


def _generate(generator, items: list[GenerationItem], scale: float = 0.7) -> list[Image.Image]:
    ip_model, tokens = generator
    return generate_batch(ip_model, tokens, items, STEPS, scale=scale, height=SIZE, width=SIZE)


CAT = [GenerationItem("cat", "a cat on the beach", 1), GenerationItem("cat", "a cat in the snow", 2)]
DOG = [GenerationItem("dog", "a dog in a bucket", 3), GenerationItem("dog", "a dog on a bed", 4)]
TOY = [GenerationItem("toy", "a toy in the jungle", 5), GenerationItem("toy", "a toy on a table", 6)]


# ----------------------------------------------------------------------------------------------
# torch.compile


def test_unet_forward_with_ip_processors_has_no_graph_breaks_in_inference(generator):
    ip_model, _ = generator
    unet = ip_model.pipe.unet
    captured = []
    handle = unet.register_forward_pre_hook(lambda module, args, kwargs: captured.append((args, kwargs)), with_kwargs=True)
    _generate(generator, CAT)
    handle.remove()
    args, kwargs = captured[0]
    assert any(isinstance(p, IPAttnProcessor) for p in unet.attn_processors.values())
    with torch.inference_mode():  # as the pipeline calls it
        explanation = torch._dynamo.explain(unet.forward)(*args, **kwargs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_inference_equals_eager_and_never_recompiles_for_scale_or_subject(generator):
    """Inductor, as on a GPU. One compile serves same-shape batches, other subjects and other scales."""
    ip_model, _ = generator
    unet = ip_model.pipe.unet
    eager = {name: _generate(generator, items) for name, items in (("cat", CAT), ("dog", DOG))}
    eager_low_scale = _generate(generator, TOY, scale=0.2)

    messages: list[str] = []
    report = speed_up_unet(unet, compile=True, announce=messages.append)
    graphs = _compiled_graphs()
    compiled_cat = _generate(generator, CAT)
    assert _compiled_graphs() == graphs + 1
    assert _max_pixel_difference(compiled_cat, eager["cat"]) <= 2
    assert _max_pixel_difference(_generate(generator, DOG), eager["dog"]) <= 2  # a new subject, same shapes
    compiled_low_scale = _generate(generator, TOY, scale=0.2)
    assert _max_pixel_difference(compiled_low_scale, eager_low_scale) <= 2
    assert _max_pixel_difference(compiled_low_scale, compiled_cat) > 2  # the scale did reach the compiled graph
    assert _compiled_graphs() == graphs + 1, "recompiled for a new subject or scale"
    assert len(messages) == 1 and "compiled in" in messages[0] and report.first_call_s > 0


def test_changing_the_scale_does_not_recompile(generator):
    """Dynamo's guards alone (the `eager` backend, seconds): a Python-float scale would recompile here."""
    ip_model, _ = generator
    speed_up_unet(ip_model.pipe.unet, compile=True, backend="eager", announce=lambda message: None)
    graphs = _compiled_graphs()
    _generate(generator, CAT)
    _generate(generator, DOG, scale=0.3)
    assert _compiled_graphs() == graphs + 1


def test_scripts_compile_the_unet_only_with_the_flag(tiny_models):
    unet = torch.nn.Conv2d(4, 4, 1)
    assert apply_speed_settings(unet, compile=False, allow_tf32=False) is None and "forward" not in vars(unet)
    report = apply_speed_settings(unet, compile=True, allow_tf32=False)
    assert "forward" in vars(unet) and report.first_call_s is None


def test_a_graph_break_is_an_error_not_a_silent_slowdown():
    class Breaking(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            torch._dynamo.graph_break()
            return x + 1

    module = Breaking()
    speed_up_unet(module, compile=True, channels_last=False, backend="eager", announce=lambda message: None)
    with pytest.raises(torch._dynamo.exc.Unsupported):
        module(torch.zeros(2))


@pytest.mark.parametrize("script", ["inference", "training"])
def test_scripts_compile_the_unet_with_the_ip_processors(script, tiny_models, tiny_pair_data, tmp_path, monkeypatch, capsys):
    """The scripts' `--compile` reaches `torch.compile` with the adapter installed (compiling itself is tested above)."""
    compiled = []

    def fake_compile(function, **options):
        compiled.append((function.__self__, options))
        return function

    monkeypatch.setattr(torch, "compile", fake_compile)
    if script == "inference":
        inference_dreambooth.main(inference_args(tiny_models, tmp_path, "--subjects", "dog", "--prompts_per_subject", "1", "--compile"))
    else:
        train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path, "--compile", steps=1))
    (unet, options), *others = compiled
    assert not others and options["fullgraph"] and any(isinstance(p, IPAttnProcessor) for p in unet.attn_processors.values())
    assert capsys.readouterr().out.count("torch.compile: UNet compiled in") == 1


def test_scale_is_a_tensor_outside_the_checkpoint():
    processor = IPAttnProcessor(hidden_size=8, cross_attention_dim=4, scale=0.5)
    assert set(processor.state_dict()) == {"to_k_ip.weight", "to_v_ip.weight"}
    set_ip_adapter_scale(processor, 0.25)
    assert isinstance(processor.scale, torch.Tensor) and processor.scale.item() == 0.25


@pytest.fixture()
def training(tiny_models, tiny_pair_data):
    loaded = load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.float32)
    maps = QualityMaps.load(tiny_pair_data.quality_file)
    source = EncoderInputs(SIZE, loaded.family, loaded.encoders.tokenizers)
    dataset = PairDataset(index_pairs(tiny_pair_data.root, maps, 1, 16), 16, 42, source, maps, DropoutRates())
    batches = [EncodedPairs.from_batch(default_collate([dataset[(i, 0)] for i in pair]), loaded.encoders) for pair in ([0, 1], [2, 3])]

    def step(batch: int) -> tuple[float, list[torch.Tensor]]:
        """Each batch carries its pairs' noise seeds, so a batch's step is the same every time."""
        loaded.model.zero_grad(set_to_none=True)
        output = training_step(loaded.model, batches[batch], Method("patch_dpo", loaded.objective, SIZE))
        output.loss.backward()
        return output.loss.item(), [p.grad.clone() for p in loaded.model.adapter_modules.parameters()]

    return loaded.model, batches, step


def test_training_forward_has_no_graph_breaks(training):
    model, batches, _ = training
    cond = batches[0]
    latents = cond.latents
    inputs = (
        latents,
        torch.tensor([10, 500, 10, 500]),
        cond.image_features,
        cond.prompt["prompt_embeds"],
        {"text_embeds": cond.prompt["pooled_prompt_embeds"].repeat(2, 1), "time_ids": torch.full((4, 6), float(SIZE))},
    )
    with torch.enable_grad():
        explanation = torch._dynamo.explain(model.forward)(*inputs)
    assert explanation.graph_break_count == 0, explanation.break_reasons
    assert explanation.graph_count == 1


def test_compiled_training_step_equals_eager_and_compiles_once(training):
    model, _, step = training
    eager = [step(0), step(1)]
    messages: list[str] = []
    speed_up_unet(model.unet, compile=True, backend=TRAIN_BACKEND, announce=messages.append)
    graphs = _compiled_graphs()
    for batch, (eager_loss, eager_grads) in enumerate(eager):
        loss, grads = step(batch)
        assert loss == pytest.approx(eager_loss, rel=1e-4)
        for got, expected in zip(grads, eager_grads, strict=True):
            torch.testing.assert_close(got, expected, rtol=1e-3, atol=1e-6)
    assert _compiled_graphs() == graphs + 1  # the second batch (other pairs, noise, timesteps) reuses the graph
    assert len(messages) == 1


# ----------------------------------------------------------------------------------------------
# The other settings


def test_channels_last_unet_gives_the_same_noise_prediction(generator):
    ip_model, _ = generator
    unet = ip_model.pipe.unet
    sample = torch.randn(2, 4, 16, 16, generator=torch.Generator().manual_seed(0))
    inputs = dict(
        timestep=torch.tensor([10, 700]),
        encoder_hidden_states=torch.randn(2, 77 + 16, unet.config.cross_attention_dim),
        added_cond_kwargs={"text_embeds": torch.randn(2, 32), "time_ids": torch.full((2, 6), 32.0)},
    )
    with torch.no_grad():
        plain = unet(sample, **inputs).sample
        speed_up_unet(unet)
        assert unet.conv_in.weight.is_contiguous(memory_format=torch.channels_last)
        torch.testing.assert_close(unet(sample, **inputs).sample, plain, rtol=1e-5, atol=1e-5)


@pytest.fixture()
def restore_tf32():
    previous = torch.backends.cuda.matmul.allow_tf32
    yield
    torch.backends.cuda.matmul.allow_tf32 = previous


@pytest.mark.parametrize("flag", [False, True])
def test_allow_tf32_is_a_flag_of_both_scripts(flag, tiny_models, restore_tf32):
    extra = ["--allow_tf32"] if flag else []
    train = train_patchdpo.parse_args(
        ["--pretrained_model_name_or_path", "m", "--data_root_path", "d", "--image_encoder_path", "e", *extra]
    )
    infer = inference_dreambooth.build_parser().parse_args(
        ["--base_model_path", "m", "--image_encoder_path", "e", "--ip_ckpt", "c", "--data_root", "d", "--output_dir", "o", *extra]
    )
    for args in (train, infer):
        torch.backends.cuda.matmul.allow_tf32 = not flag
        assert args.allow_tf32 is flag and args.compile is False
        apply_speed_settings(torch.nn.Conv2d(1, 1, 1), compile=args.compile, allow_tf32=args.allow_tf32)
        assert torch.backends.cuda.matmul.allow_tf32 is flag


def test_attention_is_sdpa_everywhere(generator):
    for module in (attention_processor, resampler):
        source = inspect.getsource(module)
        assert "scaled_dot_product_attention" in source and "softmax" not in source, module.__name__
    ip_model, _ = generator
    for module in (ip_model.pipe.unet, ip_model.pipe.vae):
        for name, processor in module.attn_processors.items():
            assert isinstance(processor, (AttnProcessor2_0, IPAttnProcessor)), name
    for encoder in (ip_model.image_encoder, ip_model.pipe.text_encoder, ip_model.pipe.text_encoder_2):
        assert encoder.config._attn_implementation == "sdpa"


@pytest.mark.parametrize(("dtype", "decode_dtype"), [(torch.bfloat16, torch.bfloat16), (torch.float16, torch.float32)])
def test_vae_decodes_in_the_pipeline_dtype_upcast_only_for_fp16(tiny_models, dtype, decode_dtype):
    """SDXL's VAE overflows in fp16 (`force_upcast`); bf16 has the range, so it decodes in bf16."""
    ip_model = load_generation_model(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", dtype)
    vae = ip_model.pipe.vae
    assert vae.config.force_upcast
    seen = []
    handle = vae.decoder.register_forward_pre_hook(lambda module, args: seen.append((args[0].dtype, module.conv_in.weight.dtype)))
    ip_model.generate(_image(0), num_samples=1, seed=0, num_inference_steps=1, height=SIZE, width=SIZE)
    handle.remove()
    assert seen and all(pair == (decode_dtype, decode_dtype) for pair in seen)
    assert vae.dtype == dtype  # back in the pipeline dtype after decoding
