"""Start-up that does not grow with starts: what was checked is recorded, a resume re-checks only what changed."""

from __future__ import annotations

import os

import pytest
from safetensors.torch import load_file, save_file

import patchdpo.validate_inputs as validate_inputs
import train_patchdpo
from common.errors import BadInputError
from patch_quality.store import QualityMaps
from patchdpo.pair_dataset import index_pairs
from patchdpo.validate_inputs import CHECKED_NAME, validate_training_inputs
from stand_ins.pairs import save_pair_data
from tests.kit.cli import bad_input_message
from tests.test_train_patchdpo import LATENT, train_args


@pytest.fixture()
def own_data(tmp_path):
    return save_pair_data(tmp_path / "data", num_samples=4, image_size=32, latent_size=LATENT)


@pytest.fixture()
def decoded(monkeypatch) -> list[str]:
    seen: list[str] = []
    real = validate_inputs.load_rgb_image_and_sha256
    monkeypatch.setattr(validate_inputs, "load_rgb_image_and_sha256", lambda path: seen.append(path.name) or real(path))
    return seen


def test_a_resume_decodes_only_the_images_that_changed(tiny_models, own_data, tmp_path, decoded):
    out = tmp_path / "out"
    base = ("--use_dpo_loss", "True", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")
    train_patchdpo.main(train_args(tiny_models, own_data, out, *base, steps=1))
    assert len(decoded) == 8 and (out / CHECKED_NAME).is_file()  # 4 references + 4 generated images
    decoded.clear()
    train_patchdpo.main(train_args(tiny_models, own_data, out, *base, steps=2))
    assert decoded == []
    changed = next((own_data.root / "sample2").glob("*_gen_0.png"))
    os.utime(changed, ns=(changed.stat().st_atime_ns, changed.stat().st_mtime_ns + 10**9))
    train_patchdpo.main(train_args(tiny_models, own_data, out, *base, steps=3))
    assert decoded == [changed.name]


def test_a_changed_maps_file_is_checked_again(tiny_models, own_data, tmp_path):
    out = tmp_path / "out"
    base = ("--use_dpo_loss", "True", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")
    train_patchdpo.main(train_args(tiny_models, own_data, out, *base, steps=1))
    tensors = load_file(str(own_data.quality_file))
    tensors["sample1/0/generated_map"][0, 0] = float("nan")
    save_file(tensors, str(own_data.quality_file), metadata=QualityMaps.load(own_data.quality_file).metadata)
    message = bad_input_message(train_patchdpo.main, train_args(tiny_models, own_data, out, *base, steps=2))
    assert "sample 'sample1' k=0" in message and "NaN" in message


def test_map_shapes_come_from_the_file_header(own_data, monkeypatch):
    maps = QualityMaps.load(own_data.quality_file)
    monkeypatch.setattr(QualityMaps, "get", lambda *args: pytest.fail("index_pairs read a map tensor"))
    assert len(index_pairs(own_data.root, maps, 1, LATENT)) == 4
    assert "expected the latent size (8, 8)" in str(pytest.raises(BadInputError, index_pairs, own_data.root, maps, 1, 8).value)


def test_the_shares_of_the_processes_cover_every_pair_once(own_data):
    maps = QualityMaps.load(own_data.quality_file)
    pairs = index_pairs(own_data.root, maps, 1, LATENT)
    shares = [validate_training_inputs(pairs[rank::3], maps, show_progress=False, maps_sha256="x") for rank in range(3)]
    merged = shares[0].merge(shares[1:])
    assert sorted(map(tuple, merged.map_keys)) == sorted((pair.sample, pair.generated_index) for pair in pairs)
    assert len(merged.images) == 8 and sum(len(share.images) for share in shares) == 8
