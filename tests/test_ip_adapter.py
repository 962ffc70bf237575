"""ip_adapter against diffusers' independent implementation of the same published model."""

from __future__ import annotations

import clip
import numpy as np
import pytest
import torch
from diffusers import StableDiffusionPipeline
from diffusers.models.attention_processor import Attention, IPAdapterAttnProcessor2_0
from PIL import Image

from common.errors import BadInputError
from ip_adapter import (
    IPAdapterPlus,
    IPAdapterPlusXL,
    IPAttnProcessor,
    Resampler,
    install_ip_adapter,
    load_ip_adapter_checkpoint,
    save_ip_adapter,
)
from ip_adapter.image_encoder import encode_image_features, load_image_encoder, preprocess_clip_images
from ip_adapter.loading import check_ip_ckpt, load_generation_model
from stand_ins.components import build_clip_tokenizer, build_resampler
from stand_ins.sd15 import load_pipeline as load_sd15_pipeline
from stand_ins.sdxl import TINY, build_sdxl_pipeline, load_pipeline

SIZE = 32
STEPS = 2


def _image(seed: int, size: int = 96) -> Image.Image:
    pixels = np.random.default_rng(seed).integers(0, 256, size=(size, size + 16, 3), dtype=np.uint8)
    return Image.fromarray(pixels)


def _assert_one_line(error: BaseException, *fragments: str) -> None:
    message = str(error)
    assert "\n" not in message
    for fragment in fragments:
        assert fragment in message


@pytest.fixture(scope="module")
def ip_model(tiny_models) -> IPAdapterPlusXL:
    return IPAdapterPlusXL(load_pipeline(tiny_models.sdxl_dir), tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu")


def test_tokenizer_matches_openai_clip() -> None:
    tokenizer = build_clip_tokenizer()
    assert len(tokenizer) == 49408
    for text in ["a photo of a dog in the jungle", "A backpack, plain white background!", "monochrome, lowres"]:
        ids = tokenizer(text).input_ids
        assert ids == clip.tokenize(text)[0][: len(ids)].tolist()


def test_resampler_has_public_sdxl_layout() -> None:
    with torch.device("meta"):
        state = Resampler(
            dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=1280, output_dim=2048, ff_mult=4
        ).state_dict()
    expected = {
        "latents": (1, 16, 1280),
        "proj_in.weight": (1280, 1280),
        "proj_in.bias": (1280,),
        "proj_out.weight": (2048, 1280),
        "proj_out.bias": (2048,),
        "norm_out.weight": (2048,),
        "norm_out.bias": (2048,),
    }
    for layer in range(4):
        prefix = f"layers.{layer}."
        expected |= {
            prefix + "0.norm1.weight": (1280,),
            prefix + "0.norm1.bias": (1280,),
            prefix + "0.norm2.weight": (1280,),
            prefix + "0.norm2.bias": (1280,),
            prefix + "0.to_q.weight": (1280, 1280),
            prefix + "0.to_kv.weight": (2560, 1280),
            prefix + "0.to_out.weight": (1280, 1280),
            prefix + "1.0.weight": (1280,),
            prefix + "1.0.bias": (1280,),
            prefix + "1.1.weight": (5120, 1280),
            prefix + "1.3.weight": (1280, 5120),
        }
    assert {key: tuple(value.shape) for key, value in state.items()} == expected
    assert Resampler.config_from_state_dict(state) == dict(
        dim=1280, depth=4, dim_head=64, heads=20, num_queries=16, embedding_dim=1280, output_dim=2048, ff_mult=4
    )


def test_resampler_matches_diffusers_image_projection() -> None:
    ours = build_resampler(TINY).eval()
    unet = build_sdxl_pipeline().unet
    theirs = unet._convert_ip_adapter_image_proj_to_diffusers(ours.state_dict(), low_cpu_mem_usage=False).eval()
    features = torch.randn(3, 50, ours.proj_in.in_features)
    with torch.no_grad():
        torch.testing.assert_close(ours(features), theirs(features), rtol=1e-5, atol=1e-5)


def test_processor_matches_diffusers_ip_adapter_processor() -> None:
    torch.manual_seed(0)
    attn = Attention(query_dim=64, cross_attention_dim=48, heads=4, dim_head=16).eval()
    ours = IPAttnProcessor(hidden_size=64, cross_attention_dim=48, num_tokens=16, scale=0.7)
    theirs = IPAdapterAttnProcessor2_0(hidden_size=64, cross_attention_dim=48, num_tokens=(16,), scale=0.7)
    theirs.to_k_ip[0].weight.data.copy_(ours.to_k_ip.weight)
    theirs.to_v_ip[0].weight.data.copy_(ours.to_v_ip.weight)
    hidden = torch.randn(2, 4 * 4, 64).view(2, 16, 64)
    text, image = torch.randn(2, 11, 48), torch.randn(2, 16, 48)
    with torch.no_grad():
        expected = theirs(attn, hidden, encoder_hidden_states=(text, [image]))
        actual = ours(attn, hidden, encoder_hidden_states=torch.cat([text, image], dim=1))
        spatial = ours(attn, hidden.transpose(1, 2).reshape(2, 64, 4, 4), encoder_hidden_states=torch.cat([text, image], dim=1))
    torch.testing.assert_close(actual, expected, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(spatial.flatten(2).transpose(1, 2), expected, rtol=1e-5, atol=1e-5)


def test_install_covers_cross_attention_with_public_keys() -> None:
    unet = build_sdxl_pipeline().unet
    names = list(unet.attn_processors)
    modules = install_ip_adapter(unet, num_tokens=16)
    processors = unet.attn_processors
    cross = [index for index, name in enumerate(names) if name.endswith("attn2.processor")]
    assert [int(key) for key in modules] == cross == list(range(1, 2 * len(cross), 2))
    assert all(isinstance(processors[name], IPAttnProcessor) == name.endswith("attn2.processor") for name in names)
    assert set(modules.state_dict()) == {f"{i}.to_{kv}_ip.weight" for i in cross for kv in "kv"}
    first = unet.down_blocks[1].attentions[0].transformer_blocks[0].attn2
    torch.testing.assert_close(modules[str(cross[0])].to_k_ip.weight, first.to_k.weight)
    torch.testing.assert_close(modules[str(cross[0])].to_v_ip.weight, first.to_v.weight)


@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_checkpoint_round_trip(tmp_path, suffix) -> None:
    unet = build_sdxl_pipeline().unet
    modules = install_ip_adapter(unet)
    resampler = build_resampler(TINY)
    path = save_ip_adapter(tmp_path / f"model{suffix}", resampler, unet)
    loaded = load_ip_adapter_checkpoint(path)
    assert loaded["image_proj"].keys() == resampler.state_dict().keys()
    assert all(t.dtype == torch.float16 for section in loaded.values() for t in section.values())
    torch.testing.assert_close(loaded["ip_adapter"]["1.to_k_ip.weight"], modules["1"].to_k_ip.weight.half())
    assert not list(tmp_path.glob(".*tmp*"))


def _pipeline_and_checkpoint(tiny_models, tmp_path, edit):
    checkpoint = load_ip_adapter_checkpoint(tiny_models.ip_ckpt)
    edit(checkpoint)
    torch.save(checkpoint, tmp_path / "bad.bin")
    return load_pipeline(tiny_models.sdxl_dir), tmp_path / "bad.bin"


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda c: c["ip_adapter"].pop("3.to_v_ip.weight"), "'3.to_v_ip.weight'"),
        (lambda c: c["ip_adapter"].__setitem__("2.to_k_ip.weight", c["ip_adapter"]["1.to_k_ip.weight"]), "'2.to_k_ip.weight'"),
        (lambda c: c["image_proj"].__setitem__("proj_in.bias", torch.zeros(3)), "'proj_in.bias'"),
        (lambda c: c.pop("image_proj"), "'image_proj'"),
        (lambda c: c["image_proj"].__setitem__("latents", c["image_proj"]["latents"][:, :8]), "num_queries=8"),
    ],
)
def test_bad_checkpoint_keys_are_one_line_errors_naming_the_file(tiny_models, tmp_path, edit, fragment) -> None:
    pipe, path = _pipeline_and_checkpoint(tiny_models, tmp_path, edit)
    with pytest.raises(BadInputError) as error:
        IPAdapterPlusXL(pipe, tiny_models.image_encoder_dir, path, "cpu")
    _assert_one_line(error.value, fragment, str(path))
    with pytest.raises(BadInputError) as error:  # loaded first (as the scripts do), then built: still the file's name
        load_generation_model(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, path, "cpu", torch.float32)
    _assert_one_line(error.value, fragment, str(path))
    assert str(error.value).count(str(path)) == 1


@pytest.mark.parametrize(
    "edit, fragment",
    [
        (lambda c: c["ip_adapter"].pop("3.to_v_ip.weight"), "missing key '3.to_v_ip.weight'"),
        (lambda c: c["image_proj"].__setitem__("proj_in.bias", torch.zeros(3)), "'proj_in.bias' has shape (3,)"),
        (lambda c: c["image_proj"].pop("latents"), "lacks 'latents'"),
    ],
)
def test_training_names_the_checkpoint_file_of_a_bad_key(tiny_models, tmp_path, edit, fragment) -> None:
    from patchdpo.models import load_training_models

    _, path = _pipeline_and_checkpoint(tiny_models, tmp_path, edit)
    with pytest.raises(BadInputError) as error:
        load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, path, "cpu", torch.float32)
    _assert_one_line(error.value, fragment, str(path))


def test_a_checkpoint_folder_names_the_file_to_pass(tiny_models, tmp_path) -> None:
    folder = tmp_path / "my_run" / "checkpoint-300"
    (folder / "training_state").mkdir(parents=True)
    for name in ("model.bin", "model.safetensors"):
        (folder / name).write_bytes(tiny_models.ip_ckpt.read_bytes())
    for check in (check_ip_ckpt, load_ip_adapter_checkpoint):
        with pytest.raises(BadInputError) as error:
            check(folder)
        _assert_one_line(error.value, f"{folder}: a folder, not a checkpoint file; pass the file in it: {folder / 'model.bin'}")
        assert "(or model.safetensors)" in str(error.value)
    assert str(error.value).startswith("IP-Adapter checkpoint ")
    with pytest.raises(BadInputError, match=r"^--ip_ckpt .*checkpoint-300/training_state: a folder, .*holds no \.bin or \.safetensors"):
        check_ip_ckpt(folder / "training_state")


def test_a_bin_checkpoint_has_the_same_bytes_whatever_its_name_and_however_often_saved(tmp_path) -> None:
    """Derived data records a checkpoint's digest: the same weights must give the same bytes (a rebuilt stand-in included)."""
    unet = build_sdxl_pipeline().unet
    install_ip_adapter(unet)
    resampler = build_resampler(TINY)
    first = save_ip_adapter(tmp_path / "model.bin", resampler, unet).read_bytes()
    again = save_ip_adapter(tmp_path / "model.bin", resampler, unet).read_bytes()
    renamed = save_ip_adapter(tmp_path / "other" / "ip-adapter.bin", resampler, unet).read_bytes()
    assert first == again == renamed


class _Payload:
    def __reduce__(self):
        return (exec, ("open('PWNED_MARKER', 'w').write('x')",))


def test_pickle_payload_checkpoint_is_refused_without_running(tmp_path, monkeypatch) -> None:
    monkeypatch.chdir(tmp_path)
    torch.save({"image_proj": _Payload(), "ip_adapter": {}}, tmp_path / "evil.bin")
    with pytest.raises(ValueError) as error:
        load_ip_adapter_checkpoint(tmp_path / "evil.bin")
    _assert_one_line(error.value, "evil.bin")
    assert not (tmp_path / "PWNED_MARKER").exists()


def test_missing_inputs_are_one_line_errors(tiny_models, tmp_path) -> None:
    pipe = load_pipeline(tiny_models.sdxl_dir)
    with pytest.raises(BadInputError) as error:
        IPAdapterPlusXL(pipe, tmp_path / "no_encoder", tiny_models.ip_ckpt, "cpu")
    _assert_one_line(error.value, "no_encoder")
    with pytest.raises(BadInputError) as error:
        IPAdapterPlusXL(pipe, tiny_models.image_encoder_dir, tmp_path / "missing.bin", "cpu")
    _assert_one_line(error.value, "missing.bin")
    sd_pipe = StableDiffusionPipeline(
        vae=pipe.vae,
        text_encoder=pipe.text_encoder,
        tokenizer=pipe.tokenizer,
        unet=pipe.unet,
        scheduler=pipe.scheduler,
        safety_checker=None,
        feature_extractor=None,
        requires_safety_checker=False,
    )
    with pytest.raises(TypeError) as error:
        IPAdapterPlusXL(sd_pipe, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu")
    _assert_one_line(error.value, "StableDiffusionXLPipeline", "StableDiffusionPipeline")


def test_image_embeds_average_groups_and_zero_image_uncond(ip_model) -> None:
    a, b, c = _image(0), _image(1), _image(2)
    single, uncond = ip_model.get_image_embeds([a, b, c])
    grouped, grouped_uncond = ip_model.get_image_embeds([[a, b], [c]])
    assert single.shape == (3, 16, 64) and grouped.shape == (2, 16, 64)
    torch.testing.assert_close(grouped[0], single[:2].mean(0))
    torch.testing.assert_close(grouped[1], single[2])
    zeros = torch.zeros(1, 3, 224, 224)
    with torch.no_grad():
        expected_uncond = ip_model.image_proj_model(encode_image_features(ip_model.image_encoder, zeros))
    torch.testing.assert_close(uncond, expected_uncond.expand(3, -1, -1))
    torch.testing.assert_close(grouped_uncond, expected_uncond.expand(2, -1, -1))


def test_image_encoder_features_are_penultimate(tiny_models) -> None:
    encoder = load_image_encoder(tiny_models.image_encoder_dir)
    pixels = preprocess_clip_images([_image(3)])
    outputs = encoder(pixels, output_hidden_states=True)
    torch.testing.assert_close(encode_image_features(encoder, pixels), outputs.hidden_states[-2])
    assert not torch.allclose(outputs.hidden_states[-2], outputs.hidden_states[-1])


def _pixels(images) -> np.ndarray:
    return np.stack([np.asarray(image, dtype=np.int16) for image in images])


def test_generate_is_seeded_and_uses_the_image(ip_model) -> None:
    kwargs = dict(num_samples=2, seed=7, num_inference_steps=STEPS, height=SIZE, width=SIZE)
    first = ip_model.generate(_image(0), **kwargs)
    again = ip_model.generate(_image(0), **kwargs)
    other = ip_model.generate(_image(1), **kwargs)
    assert len(first) == 2 and first[0].size == (SIZE, SIZE)
    assert np.array_equal(_pixels(first), _pixels(again))
    assert not np.array_equal(_pixels(first), _pixels(other))
    off = ip_model.generate(_image(0), scale=0.0, **kwargs)
    off_other = ip_model.generate(_image(1), scale=0.0, **kwargs)
    assert np.array_equal(_pixels(off), _pixels(off_other))


def test_mixed_subject_batch_equals_single_rows(ip_model) -> None:
    cond, uncond = ip_model.get_image_embeds([[_image(0), _image(1)], [_image(2)]])
    prompts, negatives = ["a dog on the beach", "a red backpack"], ["low quality", "blurry"]
    seeds = [11, 12]

    def run(rows):
        generators = [torch.Generator().manual_seed(seeds[i]) for i in rows]
        return ip_model.generate_from_tokens(
            cond[rows],
            uncond[rows],
            [prompts[i] for i in rows],
            [negatives[i] for i in rows],
            generators,
            num_inference_steps=STEPS,
            scale=0.8,
            height=SIZE,
            width=SIZE,
        )

    batch = _pixels(run([0, 1]))
    singles = np.concatenate([_pixels(run([0])), _pixels(run([1]))])
    assert np.abs(batch - singles).max() <= 2
    assert not np.array_equal(batch[0], batch[1])


FAMILIES = {
    "sdxl": ("tiny_models", "sdxl_dir", IPAdapterPlusXL, load_pipeline),
    "sd15": ("tiny_sd15_models", "sd15_dir", IPAdapterPlus, load_sd15_pipeline),
}


@pytest.mark.parametrize("family", sorted(FAMILIES))
@pytest.mark.parametrize("suffix", [".bin", ".safetensors"])
def test_checkpoint_loads_in_diffusers_and_gives_the_same_image(request, tmp_path, family, suffix) -> None:
    """diffusers' own IP-Adapter loader and processors on our exported checkpoint reproduce our images to 1e-4 on [0, 1]
    pixels (measured: max |difference| 0, bit-equal, fp32 on CPU, both families and formats)."""
    fixture, folder, wrapper, load = FAMILIES[family]
    models = request.getfixturevalue(fixture)
    reference, scale, seed = _image(5), 0.6, 3
    ours = wrapper(load(getattr(models, folder)), models.image_encoder_dir, models.ip_ckpt, "cpu")
    path = save_ip_adapter(tmp_path / f"exported{suffix}", ours.image_proj_model, ours.adapter_modules, dtype=torch.float32)
    common = dict(num_inference_steps=STEPS, height=SIZE, width=SIZE, output_type="np")
    expected = ours.generate(reference, prompt="a toy", negative_prompt="blurry", scale=scale, num_samples=1, seed=seed, **common)

    pipe = load(getattr(models, folder))
    pipe.load_ip_adapter(str(tmp_path), subfolder="", weight_name=path.name, image_encoder_folder=None)
    pipe.set_ip_adapter_scale(scale)
    pixels = preprocess_clip_images([reference])
    with torch.no_grad():
        cond = encode_image_features(ours.image_encoder, pixels)
        uncond = encode_image_features(ours.image_encoder, torch.zeros_like(pixels))
    actual = pipe(
        prompt="a toy",
        negative_prompt="blurry",
        ip_adapter_image_embeds=[torch.cat([uncond, cond])[:, None]],
        generator=torch.Generator().manual_seed(seed),
        **common,
    ).images
    print(f"{family}{suffix}: max |diffusers - ours| = {np.abs(np.asarray(actual) - np.asarray(expected)).max():.2e}")
    np.testing.assert_allclose(np.asarray(actual), np.asarray(expected), atol=1e-4)
    without = ours.generate(reference, prompt="a toy", negative_prompt="blurry", scale=0.0, num_samples=1, seed=seed, **common)
    assert np.abs(np.asarray(without) - np.asarray(expected)).max() > 1e-2  # the adapter's part is far above the tolerance
