"""The quality-map file format and the data-folder layout that training reads."""

from __future__ import annotations

import hashlib
import pickle
import shlex
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import load_file, save_file

from common.errors import BadInputError
from patch_quality import layout
from patch_quality.store import SOURCES_KEY, QualityMaps, SampleImages, remake_command, save_quality_maps


def _random_maps(keys, size=(8, 8), seed=0):
    generator = torch.Generator().manual_seed(seed)
    return {key: (torch.rand(size, generator=generator), torch.rand(size, generator=generator)) for key in keys}


def _digest(*parts) -> str:
    return hashlib.sha256(repr(parts).encode()).hexdigest()


def _sources(keys) -> dict[str, SampleImages]:
    """Made-up image digests for the samples of `keys` (k 0-3 each): what a writer binds the maps to."""
    return {sample: SampleImages(_digest(sample), {k: _digest(sample, k) for k in range(4)}) for sample, _ in keys}


def test_round_trip_values_metadata_and_reference_view(tmp_path):
    keys = [("sample0", 0), ("sample1", 0), ("sample1", 1), ("sample10", 0), ("sample2", 0)]
    maps = _random_maps(keys)
    path = tmp_path / "patch_quality.safetensors"
    save_quality_maps(path, maps, {"backbone": "tiny", "layer": "-1"}, _sources(keys))

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
    save_quality_maps(path, _random_maps([("sample0", 0)]), {}, _sources([("sample0", 0)]))
    from safetensors import safe_open

    with safe_open(str(path), framework="pt") as handle:
        assert {handle.get_tensor(name).dtype for name in handle.keys()} == {torch.float16}
    loaded = QualityMaps.load(path)
    loaded.get("sample0", 0)  # opens a handle, which must not travel into a DataLoader worker
    clone = pickle.loads(pickle.dumps(loaded))
    torch.testing.assert_close(clone.get("sample0", 0)[0], loaded.get("sample0", 0)[0])


def test_missing_key_names_sample_k_and_file(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quality_maps(path, _random_maps([("sample0", 0)]), {}, _sources([("sample0", 0)]))
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
    save_quality_maps(path, _random_maps([("sample0", 0)]), {"run": "first"}, _sources([("sample0", 0)]))
    with pytest.raises(ValueError, match="differ in shape"):
        save_quality_maps(path, {("sample0", 0): (torch.zeros(4, 4), torch.zeros(8, 8))}, {}, _sources([("sample0", 0)]))
    with pytest.raises(ValueError, match="2-D"):
        save_quality_maps(path, {("sample0", 0): (torch.zeros(1, 4, 4), torch.zeros(1, 4, 4))}, {}, _sources([("sample0", 0)]))
    with pytest.raises(ValueError, match="NaN"):
        save_quality_maps(path, {("sample0", 0): (torch.full((2, 2), float("nan")), torch.zeros(2, 2))}, {}, _sources([("sample0", 0)]))
    with pytest.raises(ValueError, match="sample name"):
        save_quality_maps(path, {("a/b", 0): (torch.zeros(2, 2), torch.zeros(2, 2))}, {}, _sources([("a/b", 0)]))
    with pytest.raises(ValueError, match=r"no image digests for the quality maps of \('sample0', 5\)"):
        save_quality_maps(path, _random_maps([("sample0", 5)]), {}, _sources([("sample0", 0)]))
    with pytest.raises(ValueError, match="reserved"):
        save_quality_maps(path, _random_maps([("sample0", 0)]), {SOURCES_KEY: "{}"}, _sources([("sample0", 0)]))
    assert QualityMaps.load(path).metadata["run"] == "first"
    assert [p.name for p in tmp_path.iterdir()] == ["q.safetensors"]


def test_equal_maps_give_equal_bytes(tmp_path):
    """safetensors writes metadata in hash-map order, another in every process: the store sorts it."""
    keys = [("sample0", 0), ("sample1", 0), ("sample1", 1)]
    metadata = {f"setting{index}": str(index) for index in range(12)}
    paths = [tmp_path / f"{name}.safetensors" for name in "ab"]
    for path, order in zip(paths, (1, -1)):  # pairs and metadata given in opposite orders
        save_quality_maps(
            path, {key: _random_maps(keys)[key] for key in keys[::order]}, dict(list(metadata.items())[::order]), _sources(keys)
        )
    assert paths[0].read_bytes() == paths[1].read_bytes()
    script = "import sys, torch; from tests.test_patch_quality_store import _random_maps, _sources; from patch_quality.store import save_quality_maps"
    script += f"; keys = {keys!r}; save_quality_maps(sys.argv[1], _random_maps(keys), {metadata!r}, _sources(keys))"
    subprocess.run([sys.executable, "-c", script, str(tmp_path / "c.safetensors")], check=True, cwd=Path(__file__).parents[1])
    assert (tmp_path / "c.safetensors").read_bytes() == paths[0].read_bytes()  # another process, another hash-map order
    loaded = QualityMaps.load(paths[0])
    assert loaded.metadata["setting3"] == "3"
    assert loaded.sources["sample1"] == SampleImages(_digest("sample1"), {k: _digest("sample1", k) for k in (0, 1)})


def test_only_the_digests_of_the_maps_written_are_stored_and_bad_ones_refused(tmp_path):
    path = tmp_path / "q.safetensors"
    save_quality_maps(path, _random_maps([("sample0", 1)]), {}, _sources([("sample0", 1)]))
    assert QualityMaps.load(path).sources == {"sample0": SampleImages(_digest("sample0"), {1: _digest("sample0", 1)})}
    for recorded in (
        "not json",
        '{"sample0": {"reference": "abc", "generated": {"1": "abc"}}}',
        '{"sample0": {"reference": "%s", "generated": {}}}' % ("0" * 64),
    ):
        tensors = load_file(str(path))
        save_file(tensors, str(path), metadata={"format": "patchdpo-quality-maps/2", SOURCES_KEY: recorded})
        with pytest.raises(BadInputError) as info:
            _ = QualityMaps.load(path).sources
        assert str(path) in str(info.value) and "\n" not in str(info.value)


def test_a_file_from_before_the_binding_loads_unbound(tmp_path):
    path = tmp_path / "q.safetensors"
    save_file(
        {"sample0/0/reference_map": torch.zeros(2, 2), "sample0/0/generated_map": torch.zeros(2, 2)},
        str(path),
        metadata={"format": "patchdpo-quality-maps/1"},
    )
    loaded = QualityMaps.load(path)
    assert loaded.keys() == [("sample0", 0)] and loaded.sources is None


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


def test_the_remake_command_reproduces_the_recorded_settings(tmp_path):
    from patch_quality.cli import maps_parser
    from patch_quality.maps import MapSettings

    settings = MapSettings(transform="threshold", good_threshold=0.7, signed=True, latent_size=64)
    recorded = {**settings.metadata(), "backbone": "/models/dino v2", "layer": "11", "feature_image_size": "224", "resolution": "512"}
    path = tmp_path / "elsewhere.safetensors"
    save_quality_maps(path, _random_maps([("sample0", 0)]), recorded, _sources([("sample0", 0)]))
    command = remake_command(QualityMaps.load(path), tmp_path / "DATA")
    words = shlex.split(command.replace("<--pretrained_model_name_or_path>", "SDXL"))
    assert words[:3] == ["python", "-m", "patch_quality.maps"]
    args = maps_parser().parse_args(words[3:])
    assert (args.data_root, args.backbone, args.layer, args.image_size, args.resolution) == (
        tmp_path / "DATA",
        Path("/models/dino v2"),
        11,
        224,
        512,
    )
    assert (args.transform, args.good_threshold, args.signed, args.output, args.base_model_path) == ("threshold", 0.7, True, path, "SDXL")
    assert "--foreground_mask" not in words and "--background_level" not in words  # defaults are left out
