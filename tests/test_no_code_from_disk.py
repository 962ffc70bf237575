"""Nothing a command reads from disk runs code.

A code-running pickle (`tests.kit.planted`: unpickling it creates a marker file) is planted where a
command reads each kind of file; the command or its real loader runs on it, the marker never appears,
and where the loader is this project's the refusal is one line naming the file. Formats that cannot
carry code (safetensors, JSON) get one representative each: the loader must refuse the pickle, not run it.
Training states: also tests/test_resume.py (every file of a state, through train_patchdpo.py) and
tests/test_training_state.py.
"""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest
from accelerate import Accelerator
from diffusers import UNet2DConditionModel

import train_patchdpo
from base_models import SDXL
from common.checkpoints import find_resume_checkpoint
from common.errors import BadInputError
from common.recorded_settings import read_recorded
from common.training_state import TRAINING_STATE_DIR, save_training_state
from dreambench.metrics import load_clip
from ip_adapter.checkpoint import load_ip_adapter_checkpoint
from ip_adapter.image_encoder import load_image_encoder
from patch_quality import convert_pkl
from patch_quality.features import finetuned_metadata
from patch_quality.store import QualityMaps
from patchdpo.feature_cache import FeatureCache
from tests.kit.cli import bad_input_message
from tests.kit.planted import plant_pickle
from tests.test_train_patchdpo import train_args
from tests.test_training_state import Trainer


@pytest.fixture()
def marker(tmp_path) -> Path:
    """Created by the planted pickle's code if anything runs it; checked after every test."""
    path = tmp_path / "code_ran"
    yield path
    assert not path.exists(), "a loader ran code from a planted pickle"


def one_line(error: pytest.ExceptionInfo, path: Path) -> str:
    message = str(error.value)
    assert str(path) in message and "\n" not in message, message
    return message


# ----------------------------------------------------------------------------------------------
# Files this project's loaders read


def test_an_ip_adapter_bin_is_read_weights_only(tiny_models, tiny_pair_data, tmp_path, marker):
    planted = plant_pickle(tmp_path / "ip-adapter.bin", marker)
    message = bad_input_message(
        train_patchdpo.main, [*train_args(tiny_models, tiny_pair_data, tmp_path / "out"), "--pretrained_ip_adapter_path", str(planted)]
    )
    assert str(planted) in message and "weights-only" in message
    for suffix in (".pt", ".pth", ".ckpt"):  # --ip_ckpt of inference, generate and construct
        with pytest.raises(BadInputError) as raised:
            load_ip_adapter_checkpoint(plant_pickle(tmp_path / f"ip-adapter{suffix}", marker))
        one_line(raised, tmp_path / f"ip-adapter{suffix}")


@pytest.mark.parametrize("name", ["state.json", "state.safetensors", "weights.safetensors", "settings.json", "custom_checkpoint_0.pkl"])
def test_a_training_state_file_replaced_by_a_pickle_is_refused(tmp_path, marker, name):
    trainer = Trainer()
    trainer.step(0)
    checkpoint = tmp_path / "out" / "checkpoint-1"
    save_training_state(Accelerator(cpu=True), checkpoint, trainer.resumable, 1, {"seed": 0})
    if name == "custom_checkpoint_0.pkl":  # what accelerate's load_state unpickled: a state written without state.json
        (checkpoint / TRAINING_STATE_DIR / "state.json").unlink()
    planted = plant_pickle(checkpoint / TRAINING_STATE_DIR / name, marker)
    with pytest.raises(BadInputError) as raised:
        find_resume_checkpoint(tmp_path / "out", "checkpoint-1")
    one_line(raised, planted if name != "custom_checkpoint_0.pkl" else planted.parent)


def test_a_quality_map_file_is_safetensors_only(tmp_path, marker):
    planted = plant_pickle(tmp_path / "patch_quality.safetensors", marker)
    with pytest.raises(BadInputError) as raised:
        QualityMaps.load(planted)
    one_line(raised, planted)


def test_the_official_pickle_is_read_by_a_restricted_unpickler(tmp_path, marker):
    planted = plant_pickle(tmp_path / "patch_quality.pkl", marker, torch_archive=False)  # the official file is a bare pickle
    (tmp_path / "DATA").mkdir()
    message = bad_input_message(convert_pkl.main, [str(planted), str(tmp_path / "maps.safetensors"), "--data_root", str(tmp_path / "DATA")])
    assert str(planted) in message and "refused to unpickle" in message
    assert not (tmp_path / "maps.safetensors").exists()


def test_a_feature_cache_file_is_safetensors_only_and_rebuilt_when_unreadable(tmp_path, marker):
    cache = FeatureCache.for_key(tmp_path / "cache", "key", SDXL.prompt_fields)
    planted = plant_pickle(cache.sample_path("sample0"), marker)
    assert not cache.is_fresh("sample0", {})  # rebuilt by the next start, never read
    with pytest.raises(BadInputError) as raised:
        cache.read_pair("sample0", 0)
    one_line(raised, planted)


def test_finetuned_backbone_blocks_are_safetensors_only(tmp_path, marker):
    planted = plant_pickle(tmp_path / "finetuned.safetensors", marker)  # ssl_train's output, --finetuned of maps
    with pytest.raises(BadInputError) as raised:
        finetuned_metadata(planted)
    one_line(raised, planted)


def test_json_files_cannot_carry_code(tmp_path, marker):
    planted = plant_pickle(tmp_path / "run_config.json", marker)  # settings.json, run_config.json: common.recorded_settings
    with pytest.raises(BadInputError) as raised:
        read_recorded(planted, "run settings")
    one_line(raised, planted)


# ----------------------------------------------------------------------------------------------
# Files the libraries read for us


def test_pickled_bin_weights_in_model_folders_are_read_weights_only(tiny_models, tmp_path, marker):
    """transformers and diffusers read a folder's `.bin` weights with torch.load(weights_only=True) (their default here)."""
    encoder = tmp_path / "image_encoder"
    shutil.copytree(tiny_models.image_encoder_dir, encoder)
    (encoder / "model.safetensors").unlink()
    plant_pickle(encoder / "pytorch_model.bin", marker)
    with pytest.raises(Exception, match="Weights only load failed"):
        load_image_encoder(encoder)
    unet = tmp_path / "unet"
    shutil.copytree(tiny_models.sdxl_dir / "unet", unet)
    (unet / "diffusion_pytorch_model.safetensors").unlink()
    plant_pickle(unet / "diffusion_pytorch_model.bin", marker)
    with pytest.raises(OSError, match="Unable to load weights"):
        UNet2DConditionModel.from_pretrained(unet, local_files_only=True)


def test_a_local_clip_file_that_is_not_torchscript_is_read_weights_only(tmp_path, marker):
    """openai-clip's `clip.load` falls back to torch.load (weights_only by default since torch 2.6) for a non-TorchScript file.

    A TorchScript archive goes through torch.jit.load, which PyTorch does not call safe for untrusted
    files: only a checksum-verified published checkpoint (a model name) is known to be OpenAI's.
    """
    planted = plant_pickle(tmp_path / "clip.pt", marker)
    with pytest.raises(BadInputError) as raised:
        load_clip(planted, "cpu")
    one_line(raised, planted)
