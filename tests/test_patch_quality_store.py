"""The quality-map file format and the data-folder layout that training reads."""

from __future__ import annotations

import pickle

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from common.errors import BadInputError
from patch_quality import layout
from patch_quality.store import QualityMaps, save_quality_maps


def _random_maps(keys, size=(8, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.rand(size, generator=generator), torch.rand(size, generator=generator)) for key in keys}


def test_round_trip_values_metadata_and_reference_view(tmp_path):
    keys = [("sample0", 0), ("sample1", 0), ("sample1", 1), ("sample10", 0), ("sample2", 0)]
    maps = _random_maps(keys)
    path = tmp_path / "patch_quality.safetensors"
    save_quality_maps(path, maps, {"backbone": "tiny", "layer": "-1"})

    loaded = QualityMaps.load(path)
    assert loaded.metadata["backbone"] == "tiny" and loaded.metadata["layer"] == "-1"
    # Numeric order, not string order.
    assert loaded.keys() == [("sample0", 0), ("sample1", 0), ("sample1", 1), ("sample2", 0), ("sample10", 0)]
    assert ("sample1", 1) in loaded and ("sample1", 2) not in loaded
    for key, (reference_map, generated_map) in maps.items():
        got_reference, got_generated = loaded.get(*key)
        assert got_reference.dtype == torch.float32 and got_reference.shape == (8, 8)
        torch.testing.assert_close(got_reference, reference_map.half().float())
        torch.testing.assert_close(got_generated, generated_map.half().float())
    # Reference-code view: [folder_idx][k] with target_map = reference, gene_map = generated.
    view = loaded[1]
    assert len(view) == 2
    torch.testing.assert_close(view[1]["target_map"], maps[("sample1", 1)][0].half().float())
    torch.testing.assert_close(view[1]["gene_map"], maps[("sample1", 1)][1].half().float())
    with pytest.raises(KeyError, match="sample3"):
        loaded[3]


def test_stored_as_float16_and_readable_after_pickling(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quality_maps(path, _random_maps([("sample0", 0)]), {})
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.float16}
    loaded = QualityMaps.load(path)
    loaded.get("sample0", 0)  # opens a handle, which must not travel into a DataLoader worker
    clone = pickle.loads(pickle.dumps(loaded))
    torch.testing.assert_close(clone.get("sample0", 0)[0], loaded.get("sample0", 0)[0])


def test_missing_key_names_sample_k_and_file(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quality_maps(path, _random_maps([("sample0", 0)]), {})
    with pytest.raises(KeyError) as info:
        QualityMaps.load(path).get("sample0", 3)
    message = str(info.value)
    assert "sample0" in message and "k=3" in message and str(path) in message and "\n" not in message


def test_load_errors_are_one_line(tmp_path):
    with pytest.raises(BadInputError, match="not found"):
        QualityMaps.load(tmp_path / "absent.safetensors")
    garbage = tmp_path / "garbage.safetensors"
    garbage.write_bytes(b"\x00" * 5)
    with pytest.raises(ValueError) as info:
        QualityMaps.load(garbage)
    assert str(garbage) in str(info.value) and "\n" not in str(info.value)
    foreign = tmp_path / "foreign.safetensors"
    save_file({"weight": torch.zeros(2)}, str(foreign))
    with pytest.raises(ValueError, match="not a quality-map file"):
        QualityMaps.load(foreign)


def test_save_rejects_bad_maps_and_keeps_previous_file(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quality_maps(path, _random_maps([("sample0", 0)]), {"run": "first"})
    with pytest.raises(ValueError, match="differ in shape"):
        save_quality_maps(path, {("sample0", 0): (torch.zeros(4, 4), torch.zeros(8, 8))}, {})
    with pytest.raises(ValueError, match="2-D"):
        save_quality_maps(path, {("sample0", 0): (torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))}, {})
    with pytest.raises(ValueError, match="NaN"):
        save_quality_maps(path, {("sample0", 0): (torch.full((2, 2), float("nan")), torch.zeros(2, 2))}, {})
    with pytest.raises(ValueError, match="sample name"):
        save_quality_maps(path, {("a/b", 0): (torch.zeros(2, 2), torch.zeros(2, 2))}, {})
    assert QualityMaps.load(path).metadata["run"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]


def _touch_png(path):
    Image.new("RGB", (4, 4)).save(path)


def test_layout_lists_samples_numerically_and_parses_files(tmp_path):
    for index in (10, 2, 0):
        folder = layout.sample_dir(tmp_path, index)
        folder.mkdir()
        _touch_png(layout.reference_path(folder, f"a red mug {index}"))
        for k in (1, 0):
            _touch_png(layout.generated_path(folder, f"a red mug {index}", k))
    (tmp_path / "notes").mkdir()
    (tmp_path / "patch_quality.safetensors").write_bytes(b"")
    (layout.sample_dir(tmp_path, 2) / ".a red mug 2_gen_5.png.tmp.png").write_bytes(b"")

    samples = layout.list_samples(tmp_path)
    assert [p.name for p in samples] == ["sample0", "sample2", "sample10"]
    prompt, reference, generated = layout.sample_files(samples[1])
    assert prompt == "a red mug 2"
    assert reference.name == "a red mug 2_entity_0.png"
    assert list(generated) == [0, 1] and generated[1].name == "a red mug 2_gen_1.png"


def test_layout_errors_are_one_line(tmp_path):
    with pytest.raises(BadInputError, match="data folder not found"):
        layout.list_samples(tmp_path / "absent")
    folder = tmp_path / "sample0"
    folder.mkdir()
    _touch_png(folder / "a cup_gen_0.png")
    with pytest.raises(ValueError, match="no reference image"):
        layout.sample_files(folder)
    _touch_png(folder / "a cup_entity_0.png")
    _touch_png(folder / "a mug_gen_0.png")
    with pytest.raises(ValueError, match="mixes several prompts"):
        layout.sample_files(folder)
    with pytest.raises(ValueError, match="cannot name a data file"):
        layout.reference_path(folder, "snake_case prompt")
