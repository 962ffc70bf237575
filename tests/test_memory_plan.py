"""patchdpo.memory_plan: counted on fake tensors, equal to what the same code holds on real tensors; flags move it the right way."""

from __future__ import annotations

import json

import pytest

from patchdpo import memory_plan
from patchdpo.memory_plan import PlanSettings, plan_training_memory
from stand_ins.sdxl import FULL, TINY, save_model_configs


@pytest.fixture(scope="module")
def tiny_configs(tmp_path_factory):
    return save_model_configs(tmp_path_factory.mktemp("configs"), TINY)


def plan(paths, fake: bool = True, **settings) -> dict:
    return plan_training_memory(str(paths.sdxl_dir), str(paths.image_encoder_dir), PlanSettings(**settings), fake=fake)


@pytest.mark.parametrize(
    "settings",
    [
        dict(resolution=64, train_batch_size=2, mixed_precision="no"),
        dict(resolution=64, train_batch_size=2, mixed_precision="bf16", validation_size=64),
    ],
)
def test_the_plan_on_fake_tensors_equals_the_bytes_real_tensors_hold(tiny_configs, settings):
    fake, real = plan(tiny_configs, **settings), plan(tiny_configs, fake=False, **settings)
    assert fake["components"].keys() == real["components"].keys()
    for name, value in fake["components"].items():
        assert value == pytest.approx(real["components"][name], rel=0.01), name
    assert fake["components"]["training step (activations + gradients)"] > 0


def test_checkpointing_a_smaller_batch_and_the_cache_lower_the_plan(tiny_configs):
    base = plan(tiny_configs, resolution=128, train_batch_size=2, mixed_precision="no")
    step = "training step (activations + gradients)"
    assert (
        plan(tiny_configs, resolution=128, train_batch_size=2, mixed_precision="no", gradient_checkpointing=True)["components"][step]
        < base["components"][step]
    )
    assert plan(tiny_configs, resolution=128, train_batch_size=1, mixed_precision="no")["components"][step] < base["components"][step]
    cached = plan(tiny_configs, resolution=128, train_batch_size=2, mixed_precision="no", cache_dir=True)
    assert cached["static_bytes"] < base["static_bytes"] and "per-step encoding (VAE, text, CLIP image)" not in cached["components"]
    assert plan(tiny_configs, resolution=128, train_batch_size=2, mixed_precision="no", gpus=8)["components"]["DDP gradient buckets"] > 0


def test_the_full_sdxl_configuration_is_planned_from_config_files_alone(tmp_path, capsys):
    paths = save_model_configs(tmp_path / "full", FULL)
    assert sorted(p.name for p in paths.sdxl_dir.rglob("*") if p.is_file()) == ["config.json"] * 4 + ["model_index.json"]  # no weights
    result = memory_plan.main(
        [
            "--pretrained_model_name_or_path",
            str(paths.sdxl_dir),
            "--image_encoder_path",
            str(paths.image_encoder_dir),
            "--json",
            str(tmp_path / "plan.json"),
        ]
    )
    stored = json.loads((tmp_path / "plan.json").read_text())
    assert stored["peak_bytes"] == result["peak_bytes"] and set(stored["components"]) == set(result["components"])
    assert stored["components"]["trainable adapter (fp32)"] == 340_787_200 * 4  # the IP-Adapter-Plus to_k_ip/to_v_ip of SDXL
    assert stored["components"]["frozen UNet weights"] == 2_567_463_684 * 2  # SDXL's UNet in fp16
    assert "fits a" in capsys.readouterr().out


def test_the_full_sd15_configuration_is_planned_through_its_family(tmp_path):
    from stand_ins import sd15

    paths = sd15.save_model_configs(tmp_path / "full", sd15.FULL)
    plan = memory_plan.main(["--pretrained_model_name_or_path", str(paths.sd15_dir), "--image_encoder_path", str(paths.image_encoder_dir)])
    assert plan["components"]["frozen UNet weights"] == 859_520_964 * 2  # SD 1.5's UNet in fp16
    assert plan["components"]["trainable adapter (fp32)"] == 19_169_280 * 4  # ip-adapter-plus_sd15's to_k_ip/to_v_ip: 16 layers to 768
    assert plan["smallest_card_gib"] == 24  # 4 pairs of 512 px per GPU, as the paper's SDXL run


def test_the_counter_sees_allocations_frees_and_autograds_saved_tensors():
    import torch

    from common.live_memory import LiveStorageCounter

    weight = torch.ones(1000, requires_grad=True)
    with LiveStorageCounter([weight]) as counter:
        doubled = weight * 2  # 4000 bytes
        assert counter.current == 4000
        loss = doubled.exp().sum()  # exp keeps its 4000-byte output for backward, though nothing in Python refers to it
        del doubled
        assert counter.current == 4000 + 4
        view = weight[:10]  # a view of an existing tensor allocates nothing
        assert counter.current == 4000 + 4 and view.numel() == 10
        loss.backward()
        del loss
        assert counter.current == 4000  # the saved output is freed; the gradient (4000 bytes) lives on in weight.grad
    assert counter.peak >= 4000 + 4000 + 4  # doubled, its exp and the sum at once


def test_8bit_adam_quarters_the_optimizer_moments(tiny_configs):
    full, eight = (
        plan(tiny_configs, resolution=64, mixed_precision="no", use_8bit_adam=flag)["components"]["AdamW moments"] for flag in (False, True)
    )
    assert eight == pytest.approx(full / 4, rel=0.01)


@pytest.mark.parametrize("family", ["sdxl", "sd15", "flux"])
def test_the_plan_rehearses_its_phases_on_fake_cuda(tmp_path, family, monkeypatch):
    """The plan's phases run again on fake CUDA: a CPU tensor made inside the step, unnoticed on the CPU, fails the rehearsal."""
    import torch
    from torch._subclasses.fake_tensor import FakeTensorDeviceMismatchError

    from patchdpo.models import IPAdapterTrainingModel
    from stand_ins import flux, sd15

    if family == "flux":
        paths = flux.save_flux_configs(tmp_path, flux.TINY)
        folder = str(paths.flux_dir)
    else:
        paths = save_model_configs(tmp_path, TINY) if family == "sdxl" else sd15.save_model_configs(tmp_path, sd15.TINY)
        folder = str(paths.sdxl_dir if family == "sdxl" else paths.sd15_dir)
    settings = PlanSettings(resolution=64, train_batch_size=1, mixed_precision="fp16", validation_size=64)
    assert plan_training_memory(folder, str(paths.image_encoder_dir), settings, rehearse=True)["peak_bytes"] > 0

    real = IPAdapterTrainingModel.forward
    monkeypatch.setattr(
        IPAdapterTrainingModel, "forward", lambda self, noisy, *rest: real(self, noisy + torch.zeros(noisy.shape[-1]), *rest)
    )
    plan_training_memory(folder, str(paths.image_encoder_dir), settings)
    with pytest.raises(FakeTensorDeviceMismatchError):
        plan_training_memory(folder, str(paths.image_encoder_dir), settings, rehearse=True)


def test_the_command_line_offers_exactly_the_planned_precisions():
    from patchdpo.cli import PRECISION_CHOICES

    assert PRECISION_CHOICES == tuple(memory_plan.PRECISIONS)


@pytest.fixture(scope="module")
def tiny_flux_configs(tmp_path_factory):
    from stand_ins import flux

    return flux.save_flux_configs(tmp_path_factory.mktemp("flux_configs"), flux.TINY)


def test_the_flux_plan_on_fake_tensors_equals_the_bytes_real_tensors_hold(tiny_flux_configs):
    from stand_ins.flux import xlabs_state

    settings = dict(resolution=64, train_batch_size=2, mixed_precision="bf16", validation_size=64)
    fake = plan_training_memory(str(tiny_flux_configs.flux_dir), str(tiny_flux_configs.image_encoder_dir), PlanSettings(**settings))
    real = plan_training_memory(
        str(tiny_flux_configs.flux_dir), str(tiny_flux_configs.image_encoder_dir), PlanSettings(**settings), fake=False
    )
    assert fake["components"].keys() == real["components"].keys()
    for name, value in fake["components"].items():
        assert value == pytest.approx(real["components"][name], rel=0.01), name
    assert fake["components"]["trainable adapter (fp32)"] == 4 * sum(t.numel() for t in xlabs_state().values())  # XLabs' keys
    assert "frozen Resampler" not in fake["components"] and fake["components"]["text encoder T5EncoderModel"] > 0


def test_sharding_the_flux_transformer_divides_its_weights_and_the_adapters_state(tiny_flux_configs):
    def flux_plan(**settings) -> dict:
        folders = str(tiny_flux_configs.flux_dir), str(tiny_flux_configs.image_encoder_dir)
        return plan_training_memory(*folders, PlanSettings(resolution=64, train_batch_size=1, mixed_precision="bf16", **settings))["components"]  # fmt: skip

    whole, sharded = flux_plan(gpus=4), flux_plan(gpus=4, shard_base=True)
    assert sharded["frozen transformer weights (1/4 shard)"] == pytest.approx(whole["frozen transformer weights"] / 4, rel=0.05)
    assert sharded["AdamW moments"] == pytest.approx(whole["AdamW moments"] / 4, rel=0.05)
    assert sharded["DDP gradient buckets"] == 0 < whole["DDP gradient buckets"]
    assert sharded["FSDP2 gathered blocks (root + running + prefetched)"] > 0


def test_the_full_flux_configuration_is_planned_from_config_files_alone(tmp_path):
    """FLUX.1-dev's published configs, sharded over 8 processes at 1024 px: the shards are those of the meta-device count."""
    import torch

    from benchmarks.sharding_memory import XLabsFluxAdapter
    from patchdpo.sharding import planned_bytes
    from stand_ins.flux import save_flux_configs

    paths = save_flux_configs(tmp_path)
    assert sorted(p.name for p in paths.flux_dir.rglob("*") if p.is_file()) == ["config.json"] * 4 + ["model_index.json"]  # no weights
    flags = ["--resolution", "1024", "--train_batch_size", "1", "--mixed_precision", "bf16", "--gradient_checkpointing", "--cache_dir"]
    folders = ["--pretrained_model_name_or_path", str(paths.flux_dir), "--image_encoder_path", str(paths.image_encoder_dir)]
    plan = memory_plan.main([*folders, *flags, "--gpus", "8", "--shard_base"])
    with torch.device("meta"):
        expected = planned_bytes(XLabsFluxAdapter(), 8)
    components = plan["components"]
    assert components["frozen transformer weights (1/8 shard)"] == expected.frozen  # 11.9 B parameters in bf16, over 8
    assert components["trainable adapter (fp32)"] == expected.trainable and components["AdamW moments"] == 2 * expected.trainable
    assert components["text encoder T5EncoderModel"] == 0  # T5-XXL freed once --cache_dir holds its outputs
    assert plan["smallest_card_gib"] == 24
