"""The official-pickle converter: both numpy module names load, payloads are refused unexecuted."""

from __future__ import annotations

import builtins
import os
import pickle
import pickletools
import shutil
import subprocess
import sys

import numpy as np
import numpy.testing
import pytest
import torch

from common.errors import BadInputError
from common.io import sha256_file
from patch_quality import layout
from patch_quality.convert_pkl import convert_pkl, restricted_load
from patch_quality.store import QualityMaps
from patchdpo.pair_dataset import TrainingPair
from patchdpo.validate_inputs import validate_training_inputs
from stand_ins.pairs import random_image, save_pair_data


def _official_maps(seed: int = 0):
    rng = np.random.default_rng(seed)
    # Outer list over folders, inner list over k, like the official `all_region_maps`.
    return [
        [{"target_map": rng.random((8, 8), dtype=np.float32), "gene_map": rng.random((8, 8), dtype=np.float32)}],
        [
            {"target_map": rng.random((8, 8)), "gene_map": rng.random((8, 8))},  # float64 also occurs
            {"target_map": rng.random((8, 8), dtype=np.float32), "gene_map": rng.random((8, 8), dtype=np.float32)},
        ],
    ]


@pytest.fixture(scope="module")
def data(tmp_path_factory):
    """The DATA `_official_maps` describe: sample0 and sample1, two generated images each."""
    return save_pair_data(tmp_path_factory.mktemp("DATA"), num_samples=2, image_size=32, latent_size=8, generated_per_sample=2).root


def _pickle_with_numpy_names(obj, numpy_core: str) -> bytes:
    """Protocol-3 pickle whose array globals name `numpy_core` (numpy 1.x: 'numpy.core').

    Protocol 3 spells globals as newline-terminated text (GLOBAL opcode) with no length prefix or
    frame, so the module name can be rewritten byte-for-byte to what numpy 1.x would have written.
    """
    data = pickle.dumps(obj, protocol=3)
    assert b"cnumpy._core.multiarray\n_reconstruct\n" in data
    data = data.replace(b"cnumpy._core.multiarray\n", f"c{numpy_core}.multiarray\n".encode())
    globals_named = {arg for op, arg, _ in pickletools.genops(data) if op.name == "GLOBAL"}
    assert globals_named == {f"{numpy_core}.multiarray _reconstruct", "numpy ndarray", "numpy dtype"}
    return data


@pytest.mark.parametrize("numpy_core", ["numpy.core", "numpy._core"])
def test_round_trip_with_numpy1_and_numpy2_names(tmp_path, numpy_core, data):
    official = _official_maps()
    source = tmp_path / "patch_quality.pkl"
    source.write_bytes(_pickle_with_numpy_names(official, numpy_core))
    out = tmp_path / "patch_quality.safetensors"
    assert convert_pkl(source, out, data) == 3

    loaded = QualityMaps.load(out)
    assert loaded.metadata["source_file"] == "patch_quality.pkl"
    for folder_idx, per_folder in enumerate(official):
        for k, entry in enumerate(per_folder):
            view = loaded[folder_idx][k]
            for role in ("target_map", "gene_map"):
                expected = torch.from_numpy(entry[role].astype(np.float16).astype(np.float32))
                torch.testing.assert_close(view[role], expected)
    # Roles: target_map is the reference image, gene_map the generated one.
    reference_map, generated_map = loaded.get("sample1", 1)
    torch.testing.assert_close(reference_map, loaded[1][1]["target_map"])
    torch.testing.assert_close(generated_map, loaded[1][1]["gene_map"])


@pytest.mark.parametrize("protocol", [4, 5])
def test_int_keyed_dicts_and_default_protocol(tmp_path, protocol, data):
    rng = np.random.default_rng(1)
    official = {0: {0: {"target_map": rng.random((4, 4)), "gene_map": rng.random((4, 4))}}}
    source = tmp_path / "maps.pkl"
    source.write_bytes(pickle.dumps(official, protocol=protocol))
    out = tmp_path / "maps.safetensors"
    assert convert_pkl(source, out, data) == 1
    assert QualityMaps.load(out).keys() == [("sample0", 0)]


class _Payload:
    """Pickles as a call of `func(*args)`: what a malicious file does on load."""

    def __init__(self, func, args):
        self.func, self.args = func, args

    def __reduce__(self):
        return self.func, self.args


def _payloads(marker):
    code = f"open({str(marker)!r}, 'w').close()"
    return {
        "os.system": _Payload(os.system, (f"touch {marker}",)),
        "builtins.open": _Payload(builtins.open, (str(marker), "w")),
        "numpy.testing": _Payload(numpy.testing.runstring, (code, {})),
        "builtins.exec": _Payload(builtins.exec, (code,)),
    }


@pytest.mark.parametrize("name", ["os.system", "builtins.open", "numpy.testing", "builtins.exec"])
def test_malicious_pickles_are_refused_without_running(tmp_path, name, data):
    marker = tmp_path / "pwned"
    payload = _payloads(marker)[name]
    # Hide the payload inside an otherwise valid file, after a genuine array.
    official = _official_maps()
    official[1][0]["gene_map"] = payload
    source = tmp_path / "evil.pkl"
    source.write_bytes(pickle.dumps(official, protocol=4))
    out = tmp_path / "out.safetensors"

    with pytest.raises(ValueError) as info:
        convert_pkl(source, out, data)
    message = str(info.value)
    assert "\n" not in message and "not allowed" in message and str(source) in message
    assert not marker.exists(), "the payload ran"
    assert not out.exists()
    assert sorted(p.name for p in tmp_path.iterdir()) == ["evil.pkl"]


def test_refusal_keeps_existing_output(tmp_path, data):
    good = tmp_path / "good.pkl"
    good.write_bytes(pickle.dumps(_official_maps(), protocol=4))
    out = tmp_path / "out.safetensors"
    convert_pkl(good, out, data)
    before = out.read_bytes()
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Payload(os.system, ("true",)), protocol=4))
    with pytest.raises(ValueError, match="os.system|posix.system"):
        convert_pkl(evil, out, data)
    assert out.read_bytes() == before


def test_other_numpy_globals_and_bad_structure_are_refused():
    with pytest.raises(pickle.UnpicklingError, match="numpy.load"):
        restricted_load(b"\x80\x03cnumpy\nload\nq\x00.")
    with pytest.raises(pickle.UnpicklingError, match="_codecs.encode"):
        restricted_load(pickle.dumps(np.zeros(2), protocol=2))


def test_wrong_structure_is_a_one_line_error(tmp_path, data):
    source = tmp_path / "bad.pkl"
    source.write_bytes(pickle.dumps([[{"target_map": np.zeros((2, 2))}]], protocol=4))
    with pytest.raises(ValueError, match=r"entry \[0\]\[0\] must be a dict with 'target_map' and 'gene_map'"):
        convert_pkl(source, tmp_path / "out.safetensors", data)
    assert not (tmp_path / "out.safetensors").exists()


def test_cli_reports_refusal_on_one_line(tmp_path, data):
    marker = tmp_path / "pwned"
    evil = tmp_path / "evil.pkl"
    evil.write_bytes(pickle.dumps(_Payload(os.system, (f"touch {marker}",)), protocol=4))
    out = tmp_path / "out.safetensors"
    result = subprocess.run(
        [sys.executable, "-m", "patch_quality.convert_pkl", str(evil), str(out), "--data_root", str(data)],
        capture_output=True,
        text=True,
        cwd=os.path.dirname(os.path.dirname(__file__)),
    )
    assert result.returncode == 2
    assert result.stderr.strip().count("\n") == 0 and "not allowed" in result.stderr
    assert not marker.exists() and not out.exists()


def test_converted_maps_are_bound_to_the_images_of_the_data_they_are_converted_for(tmp_path):
    data = save_pair_data(tmp_path / "DATA", num_samples=2, image_size=32, latent_size=8, generated_per_sample=2)
    source = tmp_path / "patch_quality.pkl"
    source.write_bytes(pickle.dumps(_official_maps(), protocol=4))
    out = tmp_path / "converted.safetensors"
    convert_pkl(source, out, data.root)
    converted = QualityMaps.load(out)
    _prompt, reference, generated = layout.sample_files(data.root / "sample1")
    assert converted.sources["sample1"].reference == sha256_file(reference)
    assert dict(converted.sources["sample1"].generated) == {0: sha256_file(generated[0]), 1: sha256_file(generated[1])}
    assert dict(converted.sources["sample0"].generated) == {0: sha256_file(data.root / "sample0" / "a red backpack_gen_0.png")}

    random_image(np.random.default_rng(7), 40, 32).save(generated[1])  # the DATA changed after the conversion
    maps = QualityMaps.load(out)
    pairs = []
    for folder, k in maps.keys():  # sample0 has maps for k=0 only: the pairs of the maps, not of --generated_per_sample
        prompt, reference, images = layout.sample_files(data.root / folder)
        pairs.append(TrainingPair(folder, k, prompt, reference, images[k]))
    problem = validate_training_inputs(pairs, maps, show_progress=False).error
    assert (
        "sample 'sample1' k=1" in problem
        and f"python -m patch_quality.convert_pkl patch_quality.pkl {out} --data_root {data.root}" in problem
    )

    shutil.rmtree(data.root / "sample1")
    with pytest.raises(BadInputError) as info:
        convert_pkl(source, tmp_path / "again.safetensors", data.root)
    assert "sample1" in str(info.value) and "--data_root" in str(info.value) and "\n" not in str(info.value)
