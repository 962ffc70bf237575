"""Quality maps are bound to the images they were computed from: training refuses maps of other images."""

from __future__ import annotations

import json
import os
import shutil

import numpy as np
import pytest
import torch
from safetensors.torch import load_file, save_file

import train_patchdpo
from common.io import sha256_file
from patch_quality.store import QualityMaps, hash_data_images, save_quality_maps
from patchdpo.pair_dataset import index_pairs
from patchdpo.validate_inputs import CHECKED_NAME, CheckedInputs, validate_training_inputs
from stand_ins.pairs import random_image, save_pair_data
from tests.kit.cli import bad_input_message
from tests.test_train_patchdpo import LATENT, train_args

REMAKE = "python -m patch_quality.maps --data_root "


def _problem(data, maps_file=None, verified=None) -> str | None:
    """The first problem training's start-up check finds in `data` with the maps of `maps_file` (default: its own)."""
    maps = QualityMaps.load(maps_file or data.quality_file)
    pairs = index_pairs(data.root, maps, 1, LATENT)
    checked = validate_training_inputs(pairs, maps, show_progress=False, verified=verified, maps_sha256=sha256_file(maps.path))
    return checked.error


@pytest.fixture()
def data(tmp_path):
    # 7 samples: sample0 and sample6 share a prompt, so their folders hold files of the same names.
    return save_pair_data(tmp_path / "data", num_samples=7, image_size=32, latent_size=LATENT)


def test_unchanged_data_passes(data):
    assert _problem(data) is None


def test_swapped_sample_folders_are_refused(data):
    assert sorted(path.name for path in (data.root / "sample0").iterdir()) == sorted(
        path.name for path in (data.root / "sample6").iterdir()
    )
    (data.root / "sample0").rename(data.root / "swap")
    (data.root / "sample6").rename(data.root / "sample0")
    (data.root / "swap").rename(data.root / "sample6")
    problem = _problem(data)
    assert "sample 'sample0' k=0" in problem and "reference image" in problem and REMAKE + str(data.root) in problem
    assert "\n" not in problem


def test_one_replaced_generated_image_is_refused(data):
    replaced = next((data.root / "sample3").glob("*_gen_0.png"))
    random_image(np.random.default_rng(99), 40, 32).save(replaced)
    problem = _problem(data)
    assert "sample 'sample3' k=0" in problem and "generated image" in problem and str(replaced) in problem
    assert REMAKE + str(data.root) in problem


def test_the_maps_of_another_data_folder_with_the_same_sample_names_are_refused(data, tmp_path):
    other = save_pair_data(tmp_path / "other", num_samples=7, image_size=32, latent_size=LATENT, seed=1)
    assert QualityMaps.load(other.quality_file).keys() == QualityMaps.load(data.quality_file).keys()
    problem = _problem(data, other.quality_file)
    assert str(other.quality_file) in problem and "sample 'sample0' k=0" in problem and REMAKE + str(data.root) in problem


def test_maps_without_image_hashes_are_refused_with_the_fix(data):
    """A file from before the binding: nothing says which images it describes, so training cannot trust it."""
    tensors = load_file(str(data.quality_file))
    save_file(tensors, str(data.quality_file), metadata={"format": "patchdpo-quality-maps/1", "backbone": "dinov2"})
    problem = _problem(data)
    assert "records no hashes of the images" in problem and REMAKE + str(data.root) + " --backbone dinov2" in problem
    save_file(tensors, str(data.quality_file), metadata={"format": "patchdpo-quality-maps/1", "source_file": "patch_quality.pkl"})
    problem = _problem(data)
    assert f"python -m patch_quality.convert_pkl patch_quality.pkl {data.quality_file} --data_root {data.root}" in problem


def test_a_resume_trusts_the_recorded_hash_of_an_unchanged_image_and_rehashes_a_changed_one(data):
    maps = QualityMaps.load(data.quality_file)
    pairs = index_pairs(data.root, maps, 1, LATENT)
    first = validate_training_inputs(pairs, maps, show_progress=False, maps_sha256="m")
    assert first.error is None and first.decoded == 14
    reference = str(pairs[2].reference_path)
    assert first.images[reference][-1] == sha256_file(reference)  # the digest of the bytes decoded, recorded with the stamp
    forged = CheckedInputs(images={**first.images, reference: [*first.images[reference][:-1], "0" * 64]}, maps_sha256="m")
    resumed = validate_training_inputs(pairs, maps, show_progress=False, verified=forged, maps_sha256="m")
    assert resumed.decoded == 0 and "sample 'sample2' k=0" in resumed.error  # not hashed again: the record was used
    replaced = pairs[4].generated_path
    random_image(np.random.default_rng(5), 40, 32).save(replaced)
    resumed = validate_training_inputs(pairs, maps, show_progress=False, verified=first, maps_sha256="m")
    assert resumed.decoded == 1 and "sample 'sample4' k=0" in resumed.error


def test_a_resume_after_replacing_a_generated_image_stops_before_training(tiny_models, tmp_path):
    data = save_pair_data(tmp_path / "data", num_samples=4, image_size=32, latent_size=LATENT)
    out = tmp_path / "out"
    base = ("--use_dpo_loss", "True", "--checkpointing_steps", "1", "--resume_from_checkpoint", "latest")
    train_patchdpo.main(train_args(tiny_models, data, out, *base, steps=1))
    assert all(len(entry) == 4 for entry in json.loads((out / CHECKED_NAME).read_text())["images"].values())
    replaced = next((data.root / "sample1").glob("*_gen_0.png"))
    shutil.copyfile(next((data.root / "sample2").glob("*_gen_0.png")), replaced)
    message = bad_input_message(train_patchdpo.main, train_args(tiny_models, data, out, *base, steps=2))
    assert "sample 'sample1' k=0" in message and "generated image" in message and REMAKE + str(data.root) in message
    assert not (out / "checkpoint-2").exists()


def test_stand_in_maps_are_bound_to_their_images(data):
    sources = QualityMaps.load(data.quality_file).sources
    folder = data.root / "sample5"
    assert sources["sample5"].reference == sha256_file(next(folder.glob("*_entity_0.png")))
    assert dict(sources["sample5"].generated) == {0: sha256_file(next(folder.glob("*_gen_0.png")))}
    assert QualityMaps.load(data.quality_file).get("sample5", 0)[0].dtype == torch.float32


def test_a_file_replaced_by_another_of_the_same_size_and_time_counts_as_changed(data):
    """What `cp -p` or an unpacked archive can do: only the inode tells the new file from the recorded one."""
    target = next((data.root / "sample3").glob("*_gen_0.png"))
    random_image(np.random.default_rng(1), 40, 32).save(target, compress_level=0)  # uncompressed: the size depends on the shape only
    maps = QualityMaps.load(data.quality_file)
    save_quality_maps(data.quality_file, {key: maps.get(*key) for key in maps.keys()}, {}, hash_data_images(data.root, maps.keys()))
    maps = QualityMaps.load(data.quality_file)
    pairs = index_pairs(data.root, maps, 1, LATENT)
    first = validate_training_inputs(pairs, maps, show_progress=False, maps_sha256="m")
    assert first.error is None
    replacement = target.with_name(".replacement.png")
    random_image(np.random.default_rng(2), 40, 32).save(replacement, compress_level=0)
    os.utime(replacement, ns=(target.stat().st_atime_ns, target.stat().st_mtime_ns))
    os.replace(replacement, target)
    assert first.images[str(target)][:2] == [target.stat().st_size, target.stat().st_mtime_ns]
    resumed = validate_training_inputs(pairs, maps, show_progress=False, verified=first, maps_sha256="m")
    assert resumed.decoded == 1 and "sample 'sample3' k=0" in resumed.error
