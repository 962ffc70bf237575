"""train_patchdpo.py and patchdpo.method on the tiny models and a tiny synthetic data set."""

from __future__ import annotations

import logging
import math
import pickle
from pathlib import Path

import pytest
import torch
from accelerate import Accelerator
from diffusers import UNet2DConditionModel
from PIL import Image
from safetensors.torch import load_file
from torch.utils.data import default_collate

import train_patchdpo
from base_models import SDXL
from base_models.sdxl import pair_time_ids
from common.training_state import TRAINING_STATE_DIR
from ip_adapter import IPAdapterPlusXL, IPAttnProcessor, load_ip_adapter_checkpoint
from patch_quality.store import QualityMaps, save_quality_maps
from patchdpo.feature_cache import CachedEncoderOutputs, FeatureCache, build_feature_cache, cache_key
from patchdpo.loop import frozen_forward
from patchdpo.method import EncodedPairs, Method, training_step
from patchdpo.models import ADAPTER_STATE_NAME, frozen_adapter_copy, load_training_models
from patchdpo.pair_dataset import DropoutRates, EncoderInputs, PairDataset, clip_training_pixels, index_pairs
from stand_ins.pairs import PairData, save_pair_data
from stand_ins.sdxl import load_pipeline
from tests.kit.cli import bad_input_message

RESOLUTION, LATENT = 32, 16  # the tiny VAE downsamples by 2
LR = 1e-3


def train_args(models, data, out: Path, *extra: str, steps: int = 2, batch: int = 2, quality: bool = True) -> list[str]:
    return [
        "--pretrained_model_name_or_path",
        str(models.sdxl_dir),
        "--image_encoder_path",
        str(models.image_encoder_dir),
        "--pretrained_ip_adapter_path",
        str(models.ip_ckpt),
        "--data_root_path",
        str(data.root),
        *(["--patch_quality_file", str(data.quality_file)] if quality else []),
        "--resolution",
        str(RESOLUTION),
        "--train_batch_size",
        str(batch),
        "--stop_step",
        str(steps),
        "--save_steps",
        str(steps),
        "--output_dir",
        str(out),
        "--logging_steps",
        "1",
        "--learning_rate",
        str(LR),
        *extra,
    ]


def adapter_state(out: Path, step: int) -> dict[str, torch.Tensor]:
    return load_file(str(out / f"checkpoint-{step}" / TRAINING_STATE_DIR / ADAPTER_STATE_NAME))


def logged(out: Path, tag: str) -> list[float]:
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    return [event.value for event in EventAccumulator(str(out / "logs" / "patchdpo")).Reload().Scalars(tag)]


def make_dataset(models, data, quality_maps=None, cache=None, dropout=DropoutRates(), clip_per_step=False) -> PairDataset:
    pairs = index_pairs(data.root, quality_maps, 1, LATENT)
    source = (
        EncoderInputs(RESOLUTION, models.family, models.encoders.tokenizers)
        if cache is None
        else CachedEncoderOutputs(cache, clip_per_step)
    )
    return PairDataset(pairs, LATENT, 42, source, quality_maps, dropout)


def collate(dataset: PairDataset, indices, epoch: int = 0) -> dict[str, torch.Tensor]:
    return default_collate([dataset[(index, epoch)] for index in indices])


@pytest.fixture()
def loaded(tiny_models):
    return load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, tiny_models.ip_ckpt, "cpu", torch.float32)


# ----------------------------------------------------------------------------------------------
# The step itself


def test_training_changes_only_to_k_ip_and_to_v_ip(loaded, tiny_pair_data):
    accelerator = Accelerator(cpu=True)
    model = loaded.model
    frozen = {
        "unet": model.unet,
        "resampler": model.image_proj_model,
        "vae": loaded.encoders.vae,
        "image_encoder": loaded.encoders.image_encoder,
        "text_encoder": loaded.encoders.text_encoders[0],
        "text_encoder_2": loaded.encoders.text_encoders[1],
    }
    before = {name: {k: v.clone() for k, v in module.state_dict().items()} for name, module in frozen.items()}
    optimizer = torch.optim.AdamW(model.adapter_modules.parameters(), lr=LR)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    maps = QualityMaps.load(tiny_pair_data.quality_file)
    dataset = make_dataset(loaded, tiny_pair_data, maps)
    for step in range(2):
        cond = EncodedPairs.from_batch(collate(dataset, [2 * step, 2 * step + 1]), loaded.encoders)
        output = training_step(prepared, cond, Method("patch_dpo", loaded.objective, RESOLUTION))
        assert math.isfinite(output.loss.item()) and output.loss.item() > 0
        accelerator.backward(output.loss)
        optimizer.step()
        optimizer.zero_grad()

    changed = []
    for name, module in frozen.items():
        for key, value in module.state_dict().items():
            if not torch.equal(value, before[name][key]):
                changed.append((name, key))
    assert changed, "nothing trained"
    assert all(name == "unet" and key.endswith((".to_k_ip.weight", ".to_v_ip.weight")) for name, key in changed), changed
    num_adapter_tensors = 2 * len(model.adapter_modules)
    assert len(changed) == num_adapter_tensors  # every adapter projection moved
    assert all(p.dtype == torch.float32 for p in model.adapter_modules.parameters())


def test_image_dpo_starts_at_log2_against_the_frozen_initial_adapter(loaded, tiny_pair_data):
    accelerator = Accelerator(cpu=True)
    model = loaded.model
    reference = frozen_adapter_copy(model)
    assert reference and all(name.endswith(("to_k_ip.weight", "to_v_ip.weight")) for name in reference)
    optimizer = torch.optim.AdamW(model.adapter_modules.parameters(), lr=LR)
    prepared, optimizer = accelerator.prepare(model, optimizer)
    cond = EncodedPairs.from_batch(collate(make_dataset(loaded, tiny_pair_data), [0, 1]), loaded.encoders)
    method = Method(
        "image_dpo", loaded.objective, RESOLUTION, dpo_beta=5000.0, reference_forward=frozen_forward(accelerator, prepared, reference)
    )

    first = training_step(prepared, cond, method)
    assert first.loss.item() == pytest.approx(math.log(2), abs=1e-6)  # trained == reference at step 0
    accelerator.backward(first.loss)
    optimizer.step()
    second = training_step(prepared, cond, method)
    assert math.isfinite(second.loss.item()) and second.loss.item() != pytest.approx(math.log(2), abs=1e-6)
    # The reference branch still predicts with the initial weights after the update.
    assert second.logs["reference_mse"].item() == pytest.approx(first.logs["reference_mse"].item(), rel=1e-6)
    assert second.logs["model_mse"].item() != pytest.approx(first.logs["model_mse"].item(), rel=1e-6)


def test_gradient_checkpointing_gives_the_same_loss_and_gradients(loaded, tiny_pair_data):
    model = loaded.model
    cond = EncodedPairs.from_batch(collate(make_dataset(loaded, tiny_pair_data), [0, 1]), loaded.encoders)

    def loss_and_grads():
        model.zero_grad(set_to_none=True)
        output = training_step(model, cond, Method("mse", loaded.objective, RESOLUTION))
        output.loss.backward()
        return output.loss.item(), [p.grad.clone() for p in model.adapter_modules.parameters()]

    plain_loss, plain_grads = loss_and_grads()
    model.unet.enable_gradient_checkpointing()
    checkpointed_loss, checkpointed_grads = loss_and_grads()
    assert checkpointed_loss == pytest.approx(plain_loss, rel=1e-6)
    for a, b in zip(plain_grads, checkpointed_grads):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-7)


def test_training_from_scratch_copies_to_k_to_v_and_builds_a_fresh_resampler(tiny_models, caplog):
    with caplog.at_level(logging.WARNING):
        models = load_training_models(tiny_models.sdxl_dir, tiny_models.image_encoder_dir, None, "cpu", torch.float32)
    assert "no --pretrained_ip_adapter_path" in caplog.text
    resampler = models.model.image_proj_model
    assert resampler.latents.shape == (1, SDXL.fresh_resampler["num_queries"], SDXL.fresh_resampler["dim"])
    assert not any(p.requires_grad for p in resampler.parameters())
    layers = dict(models.model.unet.named_modules())
    for name, processor in models.model.unet.attn_processors.items():
        if isinstance(processor, IPAttnProcessor):
            attn = layers[name[: -len(".processor")]]
            assert torch.equal(processor.to_k_ip.weight, attn.to_k.weight)
            assert torch.equal(processor.to_v_ip.weight, attn.to_v.weight)


# ----------------------------------------------------------------------------------------------
# SDXL time ids


def test_official_time_ids_are_the_scrambled_rows_the_analysis_describes():
    ref = torch.tensor([[100.0, 200.0], [300.0, 400.0]])
    gen = torch.tensor([[110.0, 210.0], [310.0, 410.0]])
    ids = pair_time_ids(ref, gen, 512, official=True)
    expected = torch.tensor(
        [
            [100, 200, 110, 210, 0, 0],  # latent ref_0 <- pair 0, first half of its 12 numbers
            [0, 0, 512, 512, 512, 512],  # latent ref_1 <- pair 0, second half
            [300, 400, 310, 410, 0, 0],  # latent gen_0 <- pair 1
            [0, 0, 512, 512, 512, 512],  # latent gen_1
        ],
        dtype=torch.float32,
    )
    torch.testing.assert_close(ids, expected)
    correct = pair_time_ids(ref, gen, 512)
    torch.testing.assert_close(
        correct,
        torch.tensor(
            [
                [100, 200, 0, 0, 512, 512],
                [300, 400, 0, 0, 512, 512],
                [110, 210, 0, 0, 512, 512],
                [310, 410, 0, 0, 512, 512],
            ],
            dtype=torch.float32,
        ),
    )


def test_official_time_ids_feed_the_unet_exactly_what_the_reference_code_fed(tiny_models):
    unet = UNet2DConditionModel.from_pretrained(tiny_models.sdxl_dir, subfolder="unet", local_files_only=True).eval()
    b = 2
    ref = torch.tensor([[512.0, 512.0], [640.0, 480.0]])
    gen = torch.tensor([[1024.0, 1024.0], [512.0, 768.0]])
    # What the official script builds: per-pair (B, 2, 2) tensors concatenated along dim 1 -> (B, 6, 2).
    official_raw = torch.cat([torch.stack([ref, gen], 1), torch.zeros(b, 2, 2), torch.full((b, 2, 2), 512.0)], dim=1)
    generator = torch.Generator().manual_seed(0)
    latents = torch.randn(2 * b, 4, 8, 8, generator=generator)
    hidden = torch.randn(2 * b, 77, unet.config.cross_attention_dim, generator=generator)
    pooled = torch.randn(2 * b, 32, generator=generator)

    def run(time_ids: torch.Tensor) -> torch.Tensor:
        with torch.no_grad():
            added = {"text_embeds": pooled, "time_ids": time_ids}
            return unet(latents, torch.tensor([10, 500] * 2), hidden, added_cond_kwargs=added).sample

    official = run(pair_time_ids(ref, gen, 512, official=True))
    assert torch.equal(official, run(official_raw))
    assert not torch.allclose(official, run(pair_time_ids(ref, gen, 512)))


# ----------------------------------------------------------------------------------------------
# Data: dropout, CLIP crop, feature cache


def field_of(pairs: EncodedPairs, name: str) -> torch.Tensor:
    return pairs.prompt[name] if name in pairs.prompt else getattr(pairs, name)


def test_cached_features_equal_the_encoders_on_the_fly_including_dropout(loaded, tiny_models, tmp_path):
    data = save_pair_data(tmp_path / "data", 4, 32, LATENT)
    pairs = index_pairs(data.root, None, 1, LATENT)
    key = cache_key(RESOLUTION, tiny_models.sdxl_dir, tiny_models.image_encoder_dir, torch.float32)
    cache = FeatureCache.for_key(tmp_path / "cache", key, loaded.family.prompt_fields)
    assert build_feature_cache(cache, pairs, loaded.encoders, RESOLUTION, show_progress=False) == len(pairs)
    assert build_feature_cache(cache, pairs, loaded.encoders, RESOLUTION, show_progress=False) == 0  # resumable

    dropout = DropoutRates(image=0.3, text=0.3, both=0.3)
    live = make_dataset(loaded, data, dropout=dropout)
    cached = make_dataset(loaded, data, cache=cache, dropout=dropout)
    seen = set()
    for epoch in range(3):
        for index in range(len(pairs)):
            a = EncodedPairs.from_batch(collate(live, [index], epoch), loaded.encoders)
            b_batch = collate(cached, [index], epoch)
            b = EncodedPairs.from_batch(b_batch, loaded.encoders.kept_with_cache(clip_per_step=False))
            seen.add((bool(b_batch["drop_image"]), bool(b_batch["drop_text"])))
            for field in ("latents", "image_features", "prompt_embeds", "pooled_prompt_embeds", "reference_size", "generated_size"):
                torch.testing.assert_close(field_of(a, field), field_of(b, field), atol=1e-5, rtol=1e-5)
    assert {(True, False), (False, True), (True, True), (False, False)} <= seen

    Image.new("RGB", (32, 32), "white").save(pairs[0].reference_path)  # a changed source is rebuilt
    assert build_feature_cache(cache, pairs, loaded.encoders, RESOLUTION, show_progress=False) == 1


def test_cache_with_non_square_references_draws_the_same_clip_crops(loaded, tiny_models, tmp_path):
    data = save_pair_data(tmp_path / "data", 3, 32, LATENT, reference_sizes={1: (48, 32), 2: (32, 40)})
    pairs = index_pairs(data.root, None, 1, LATENT)
    cache = FeatureCache.for_key(tmp_path / "cache", "key", SDXL.prompt_fields)
    build_feature_cache(cache, pairs, loaded.encoders, RESOLUTION, show_progress=False)
    assert [cache.has_clip_features(p.sample) for p in pairs] == [True, False, False]
    assert cache.needs_clip_per_step(pairs) and not cache.needs_clip_per_step(pairs[:1])
    dropout = DropoutRates(image=0.3, text=0.3, both=0.0)
    live = make_dataset(loaded, data, dropout=dropout)
    cached = make_dataset(loaded, data, cache=pickle.loads(pickle.dumps(cache)), dropout=dropout, clip_per_step=True)  # as in a worker
    crops = set()
    for epoch in range(4):
        batch = collate(cached, [0, 1, 2], epoch)
        a = EncodedPairs.from_batch(collate(live, [0, 1, 2], epoch), loaded.encoders)
        b = EncodedPairs.from_batch(batch, loaded.encoders.kept_with_cache(clip_per_step=True))
        crops.add(batch["clip_pixels"][1, 0, 0, :8].sum().item())
        for field in ("latents", "image_features", "prompt_embeds", "pooled_prompt_embeds"):
            torch.testing.assert_close(field_of(a, field), field_of(b, field), atol=1e-5, rtol=1e-5)
    assert len(crops) > 1  # the wide reference's crop does move between epochs


def test_clip_crop_is_random_only_for_non_square_references(tmp_path):
    Image.linear_gradient("L").rotate(90).resize((64, 32)).convert("RGB").save(tmp_path / "wide.png")  # varies along x
    crops = {tuple(clip_training_pixels(tmp_path / "wide.png", torch.Generator().manual_seed(s))[0, 0, :4].tolist()) for s in range(6)}
    assert len(crops) > 1
    with pytest.raises(ValueError, match="not square"):
        clip_training_pixels(tmp_path / "wide.png", None)
    Image.new("RGB", (48, 48), "white").save(tmp_path / "square.png")
    assert clip_training_pixels(tmp_path / "square.png", None).shape == (3, 224, 224)


# ----------------------------------------------------------------------------------------------
# The script end to end


def test_script_trains_logs_and_writes_checkpoints_that_load_in_ip_adapter_and_diffusers(tiny_models, tiny_pair_data, tmp_path):
    out = tmp_path / "run"
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, out, "--use_dpo_loss", "True"))

    checkpoint = out / "checkpoint-2"
    state = torch.load(checkpoint / "model.bin", map_location="cpu", weights_only=True)
    assert set(state) == {"image_proj", "ip_adapter"}
    assert all(t.dtype == torch.float16 for section in state.values() for t in section.values())
    initial = load_ip_adapter_checkpoint(tiny_models.ip_ckpt)
    for key, value in initial["image_proj"].items():
        assert torch.equal(state["image_proj"][key], value.half()), key  # the Resampler is frozen
    assert all(not torch.equal(state["ip_adapter"][k], v.half()) for k, v in initial["ip_adapter"].items())
    from_safetensors = load_ip_adapter_checkpoint(checkpoint / "model.safetensors")
    assert all(torch.equal(from_safetensors["ip_adapter"][k], v) for k, v in state["ip_adapter"].items())

    ours = IPAdapterPlusXL(load_pipeline(tiny_models.sdxl_dir), tiny_models.image_encoder_dir, checkpoint / "model.bin", device="cpu")
    images = ours.generate(Image.new("RGB", (32, 32), "red"), num_samples=1, seed=0, num_inference_steps=2, height=32, width=32)
    assert images[0].size == (32, 32)

    pipe = load_pipeline(tiny_models.sdxl_dir)
    pipe.load_ip_adapter(str(checkpoint), subfolder="", weight_name="model.safetensors", image_encoder_folder=None)
    loaded = [p for p in pipe.unet.attn_processors.values() if hasattr(p, "to_k_ip")]
    assert len(loaded) == len(state["ip_adapter"]) // 2
    for index, processor in zip(sorted({int(k.split(".")[0]) for k in state["ip_adapter"]}), loaded):
        torch.testing.assert_close(processor.to_k_ip[0].weight.data, state["ip_adapter"][f"{index}.to_k_ip.weight"].float())

    for tag in ("loss", "lr", "samples_per_s"):
        values = logged(out, tag)
        assert len(values) == 2 and all(math.isfinite(v) for v in values), tag


@pytest.mark.parametrize("batch, accumulation", [(2, 1), (1, 2)])
def test_resuming_3_plus_2_steps_equals_5_straight_steps(tiny_models, tiny_pair_data, tmp_path, batch, accumulation):
    # 5 samples, 2 pairs per optimizer step: 2 steps per epoch (the fifth pair is dropped), so the resumed run
    # starts inside epoch 1, after its first step's micro-batches, and crosses into epoch 2, in the LR warmup.
    def run(out: Path, steps: int, *extra: str) -> None:
        schedule = ("--lr_scheduler", "constant_with_warmup", "--lr_warmup_steps", "4", "--gradient_accumulation_steps", str(accumulation))
        train_patchdpo.main(
            train_args(tiny_models, tiny_pair_data, out, "--use_dpo_loss", "True", *schedule, *extra, steps=steps, batch=batch)
        )

    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    run(straight, 5, "--checkpointing_steps", "5")
    run(resumed, 3, "--checkpointing_steps", "3")
    run(resumed, 5, "--checkpointing_steps", "5", "--resume_from_checkpoint", "latest", "--dataloader_num_workers", "1")
    a, b = adapter_state(straight, 5), adapter_state(resumed, 5)
    assert a.keys() == b.keys()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not all(torch.equal(a[k], adapter_state(resumed, 3)[k]) for k in a)


def test_cache_with_non_square_references_trains_as_without(tiny_models, tmp_path):
    data = save_pair_data(tmp_path / "data", 2, 32, LATENT, reference_sizes={1: (48, 32)})
    extra = ("--image_drop_rate", "0.3", "--checkpointing_steps", "3")
    train_patchdpo.main(train_args(tiny_models, data, tmp_path / "live", *extra, steps=3, batch=1))
    train_patchdpo.main(
        train_args(tiny_models, data, tmp_path / "cached", *extra, "--cache_dir", str(tmp_path / "cache"), steps=3, batch=1)
    )
    assert logged(tmp_path / "cached", "loss") == pytest.approx(logged(tmp_path / "live", "loss"), rel=1e-5)
    a, b = adapter_state(tmp_path / "live", 3), adapter_state(tmp_path / "cached", 3)
    assert torch.cat([(a[k] - b[k]).abs().flatten() for k in a]).mean().item() < LR * 1e-3


def test_cache_does_not_change_what_is_trained(tiny_models, tiny_pair_data, tmp_path):
    # Also runs the image-level DPO ablation and the official time ids end to end.
    extra = (
        "--loss",
        "image_dpo",
        "--dpo_beta",
        "50",
        "--official_time_ids",
        "--checkpointing_steps",
        "2",
        "--image_drop_rate",
        "0.3",
        "--text_drop_rate",
        "0.3",
    )
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path / "live", *extra))
    train_patchdpo.main(train_args(tiny_models, tiny_pair_data, tmp_path / "cached", *extra, "--cache_dir", str(tmp_path / "cache")))
    assert logged(tmp_path / "cached", "loss") == pytest.approx(logged(tmp_path / "live", "loss"), rel=1e-5)
    a, b = adapter_state(tmp_path / "live", 2), adapter_state(tmp_path / "cached", 2)
    # Adam turns float noise in near-zero gradients into rare flips of size ~lr; a different dropout or
    # input would move most weights by ~lr, so compare the mean deviation.
    mean_deviation = torch.cat([(a[k] - b[k]).abs().flatten() for k in a]).mean().item()
    assert mean_deviation < LR * 1e-3


# ----------------------------------------------------------------------------------------------
# Errors


def _expect_exit(argv: list[str], message: str) -> None:
    error = bad_input_message(train_patchdpo.main, argv)
    assert message in error, error


def test_missing_quality_map_entry(tiny_models, tmp_path):
    data = save_pair_data(tmp_path / "data", 2, 32, LATENT)
    maps = QualityMaps.load(data.quality_file)
    save_quality_maps(data.quality_file, {("sample0", 0): maps.get("sample0", 0)}, {}, maps.sources)
    _expect_exit(train_args(tiny_models, data, tmp_path / "out", "--use_dpo_loss", "True"), "no quality maps for sample 'sample1' k=0")


def test_quality_maps_not_at_latent_size(tiny_models, tmp_path):
    data = save_pair_data(tmp_path / "data", 2, 32, LATENT, map_size=8)
    _expect_exit(
        train_args(tiny_models, data, tmp_path / "out", "--use_dpo_loss", "True"),
        "expected the latent size (16, 16); remake them for this model and --resolution: python -m patch_quality.maps",
    )


def test_data_dir_without_samples_or_images(tiny_models, tmp_path):
    data = save_pair_data(tmp_path / "data", 2, 32, LATENT)
    empty = PairData(tmp_path / "empty", data.quality_file, 0)
    empty.root.mkdir()
    _expect_exit(train_args(tiny_models, empty, tmp_path / "out"), "holds no 'sample{i}' folders")
    next((data.root / "sample1").glob("*_gen_0.png")).unlink()
    _expect_exit(train_args(tiny_models, data, tmp_path / "out"), "no generated image")


def test_resume_from_a_folder_without_training_state(tiny_models, tiny_pair_data, tmp_path):
    (tmp_path / "checkpoint-3").mkdir()
    argv = train_args(tiny_models, tiny_pair_data, tmp_path / "out", "--resume_from_checkpoint", str(tmp_path / "checkpoint-3"))
    _expect_exit(argv, "holds no training_state/")


@pytest.mark.parametrize(
    "extra, quality, message",
    [
        (("--loss", "mse", "--use_dpo_loss", "True"), True, "contradicts"),
        (("--use_dpo_loss", "True"), False, "needs --patch_quality_file"),
        (("--stop_step", "0"), True, "--stop_step must be >= 1"),
    ],
)
def test_bad_flags_are_parser_errors(tiny_models, tiny_pair_data, tmp_path, capsys, extra, quality, message):
    argv = train_args(tiny_models, tiny_pair_data, tmp_path / "out", *extra, quality=quality)
    with pytest.raises(SystemExit) as raised:
        train_patchdpo.main(argv)
    assert raised.value.code == 2
    assert message in capsys.readouterr().err
