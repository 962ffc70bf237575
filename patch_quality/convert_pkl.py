"""Convert the official `patch_quality.pkl` into our `patch_quality.safetensors`.

The official file is `all_region_maps[folder_idx][k] = {"target_map": array, "gene_map": array}`
(outer containers lists or int-keyed dicts). Unpickling runs whatever callables the file names, so
the unpickler here resolves exactly the globals numpy needs to rebuild an array under pickle
protocols 3-5, under both the numpy 1.x module paths (`numpy.core.*`) the official file was almost
certainly written with and the numpy 2 paths (`numpy._core.*`):

    numpy.core.multiarray._reconstruct / numpy._core.multiarray._reconstruct   (protocols 3-4)
    numpy.core.numeric._frombuffer / numpy._core.numeric._frombuffer           (protocol 5, in-band)
    numpy.ndarray
    numpy.dtype

Anything else (`os.system`, `builtins.open`, any `numpy.testing` helper, `_codecs.encode` used by
protocol 0-2 bytes) is refused before it is called. A whole `numpy.*` module is never allowed:
`numpy.testing` alone can run code.

The pickle records nothing about the images its maps describe, so the conversion binds them to the
DATA they are converted for, the way `patch_quality.maps` binds its own: the output records the
SHA-256 of `DATA/sample{i}`'s reference and `gen_{k}` image for every entry `[i][k]`, and training
refuses the maps once those images change. Bind to the DATA the pickle was computed from: nothing
here can check that the maps describe those images.

    python -m patch_quality.convert_pkl patch_quality.pkl DATA/patch_quality.safetensors --data_root DATA
"""

from __future__ import annotations

import io
import os
import pickle
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from common.cli import exit_on_reported_error
from common.errors import BadInputError
from common.io import sha256_file
from common.outputs import check_output_file
from patch_quality.cli import CONVERT_PROG, convert_pkl_config

if TYPE_CHECKING:
    import torch

ALLOWED_GLOBALS: frozenset[tuple[str, str]] = frozenset(
    {
        ("numpy.core.multiarray", "_reconstruct"),
        ("numpy._core.multiarray", "_reconstruct"),
        ("numpy.core.numeric", "_frombuffer"),
        ("numpy._core.numeric", "_frombuffer"),
        ("numpy", "ndarray"),
        ("numpy", "dtype"),
    }
)


class RestrictedUnpickler(pickle.Unpickler):
    """An unpickler that can build plain containers and numeric numpy arrays, and nothing else."""

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) not in ALLOWED_GLOBALS:
            raise pickle.UnpicklingError(f"global '{module}.{name}' is not allowed (only numpy array reconstruction is)")
        # numpy 2 keeps `numpy.core` as a deprecated alias; resolve the real functions directly so
        # an old-name file loads without importing the alias module or warning.
        if name == "_reconstruct":
            from numpy._core.multiarray import _reconstruct

            return _reconstruct
        if name == "_frombuffer":
            from numpy._core.numeric import _frombuffer

            return _frombuffer
        return np.ndarray if name == "ndarray" else np.dtype

    def persistent_load(self, pid: Any) -> Any:
        raise pickle.UnpicklingError("persistent ids are not allowed")


def restricted_load(data: bytes) -> Any:
    return RestrictedUnpickler(io.BytesIO(data)).load()


def _entries(container: Any, what: str) -> list[tuple[int, Any]]:
    if isinstance(container, (list, tuple)):
        return list(enumerate(container))
    if isinstance(container, dict):
        if not all(isinstance(key, int) and not isinstance(key, bool) and key >= 0 for key in container):
            raise BadInputError(f"{what} must be indexed by non-negative ints, got keys {sorted(map(repr, container))[:5]}")
        return sorted(container.items())
    raise BadInputError(f"{what} must be a list or an int-keyed dict, got {type(container).__name__}")


def _map_tensor(value: Any, where: str) -> torch.Tensor:
    import torch  # here, not at the top: --help must not wait for torch

    if not isinstance(value, np.ndarray):
        raise BadInputError(f"{where} must be a numpy array, got {type(value).__name__}")
    if value.dtype.kind not in "fiub":
        raise BadInputError(f"{where} must hold real numbers, got dtype {value.dtype}")
    if value.ndim != 2:
        raise BadInputError(f"{where} must be 2-D (H, W), got shape {value.shape}")
    return torch.from_numpy(np.ascontiguousarray(value, dtype=np.float32))


def official_maps_to_store(all_region_maps: Any) -> dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]]:
    """Map `all_region_maps[folder][k]` to store keys `("sample{folder}", k)`."""
    maps: dict[tuple[str, int], tuple[torch.Tensor, torch.Tensor]] = {}
    for folder_idx, per_folder in _entries(all_region_maps, "the top level"):
        for k, entry in _entries(per_folder, f"entry [{folder_idx}]"):
            where = f"entry [{folder_idx}][{k}]"
            if not isinstance(entry, dict) or not {"target_map", "gene_map"} <= entry.keys():
                raise BadInputError(f"{where} must be a dict with 'target_map' and 'gene_map'")
            maps[(f"sample{folder_idx}", k)] = (
                _map_tensor(entry["target_map"], f"{where}['target_map']"),
                _map_tensor(entry["gene_map"], f"{where}['gene_map']"),
            )
    return maps


def convert_pkl(input_path: str | os.PathLike, output_path: str | os.PathLike, data_root: str | os.PathLike) -> int:
    """Convert one official pickle, bound to the images of `data_root`; returns the number of (sample, k) pairs written.

    Everything is validated (an entry `[i][k]` needs `data_root/sample{i}` and its `gen_{k}`
    image) before the output is written (atomically), so a refused file never leaves a partial
    output behind and never replaces an existing one.
    """
    input_path = Path(input_path)
    if not input_path.is_file():
        raise BadInputError(f"pickle file not found: {input_path}")
    try:
        all_region_maps = restricted_load(input_path.read_bytes())
    except Exception as error:  # any failure inside pickle is the file's fault: report it on one line
        message = " ".join(str(error).split()) or type(error).__name__
        raise BadInputError(f"{input_path}: refused to unpickle: {message}") from None
    try:
        maps = official_maps_to_store(all_region_maps)
    except ValueError as error:
        raise BadInputError(f"{input_path}: {error}") from None
    if not maps:
        raise BadInputError(f"{input_path}: holds no quality maps")
    from patch_quality.store import hash_data_images, save_quality_maps

    try:
        sources = hash_data_images(data_root, maps)
    except BadInputError as error:
        raise BadInputError(
            f"{input_path} has maps of images --data_root {data_root} lacks ({error}); --data_root must be the DATA they were computed for"
        ) from None
    metadata = {
        "source": "official patch_quality.pkl (converted by patch_quality.convert_pkl)",
        "source_file": input_path.name,
        "source_sha256": sha256_file(input_path),
    }
    save_quality_maps(output_path, maps, metadata, sources)
    return len(maps)


def main(argv: list[str] | None = None) -> None:
    config = convert_pkl_config(argv)
    from accelerate import PartialState

    # One file, one writer: under `accelerate launch` the other processes have nothing to do.
    if not PartialState(cpu=True).is_main_process:
        return
    with exit_on_reported_error(CONVERT_PROG):
        check_output_file(config.output, "output")
        count = convert_pkl(config.input, config.output, config.data_root)
    print(f"wrote {count} map pairs to {config.output}")


if __name__ == "__main__":
    main()
