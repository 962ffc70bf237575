"""The one reader and writer of `patch_quality.safetensors`.

Each (sample folder, k) pair holds two maps at the latent grid: the reference map (how well each
reference patch is reproduced in generated image k) and the generated map (how faithful each patch
of generated image k is to the reference). Training weights the reference half of a pair by
`1 - reference_map` and the generated half by `generated_map`.

The file is plain safetensors (no pickle), float16 tensors named
`{sample}/{k}/reference_map` and `{sample}/{k}/generated_map`, plus string metadata describing how
the maps were made. Reading is lazy (memory-mapped per process) so a dataset holding a
`QualityMaps` can be forked into DataLoader workers without copying every map.

The official code indexes its pickle as `all_region_maps[folder_idx][k]` with keys `target_map`
(reference image) and `gene_map` (generated image); `QualityMaps[folder_idx]` exposes the same view,
folder index `i` meaning the folder `sample{i}`, so a converted official file and one of ours read
the same way.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.errors import BadInputError
from common.io import atomic_path

FORMAT_KEY = "format"
FORMAT_VALUE = "patchdpo-quality-maps/1"
REFERENCE_SUFFIX = "reference_map"
GENERATED_SUFFIX = "generated_map"

_TENSOR_NAME = re.compile(r"^(?P<sample>[^/]+)/(?P<k>\d+)/(?P<role>reference_map|generated_map)$")


def _tensor_name(sample: str, k: int, role: str) -> str:
    return f"{sample}/{k}/{role}"


def _check_key(key: Any) -> tuple[str, int]:
    if not (isinstance(key, tuple) and len(key) == 2):
        raise ValueError(f"quality-map key must be (sample_folder_name, k), got {key!r}")
    sample, k = key
    if not isinstance(sample, str) or not sample or "/" in sample:
        raise ValueError(f"quality-map sample name must be a non-empty folder name without '/', got {sample!r}")
    if isinstance(k, bool) or not isinstance(k, int) or k < 0:
        raise ValueError(f"quality-map index k must be a non-negative int, got {k!r} for sample {sample!r}")
    return sample, k


def save_quality_maps(
    path: str | os.PathLike,
    maps: Mapping[tuple[str, int], tuple[torch.Tensor, torch.Tensor]],
    metadata: Mapping[str, str],
) -> None:
    """Write every (reference_map, generated_map) pair as float16, atomically.

    Maps must be finite 2-D tensors and both maps of a pair must share one (H, W): they weight the
    two halves of the same latent batch.
    """
    meta: dict[str, str] = {}
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"quality-map metadata must map str to str, got {name!r}: {value!r}")
        if name == FORMAT_KEY:
            raise ValueError(f"quality-map metadata key {FORMAT_KEY!r} is reserved for the file format tag")
        meta[name] = value
    meta[FORMAT_KEY] = FORMAT_VALUE

    tensors: dict[str, torch.Tensor] = {}
    for key, pair in maps.items():
        sample, k = _check_key(key)
        if not (isinstance(pair, (tuple, list)) and len(pair) == 2):
            raise ValueError(f"quality maps for ({sample!r}, {k}) must be a (reference_map, generated_map) pair")
        reference_map, generated_map = (torch.as_tensor(m) for m in pair)
        for role, tensor in ((REFERENCE_SUFFIX, reference_map), (GENERATED_SUFFIX, generated_map)):
            if tensor.ndim != 2:
                raise ValueError(f"{role} for ({sample!r}, {k}) must be 2-D (H, W), got shape {tuple(tensor.shape)}")
            if not torch.isfinite(tensor).all():
                raise ValueError(f"{role} for ({sample!r}, {k}) contains NaN or inf")
        if reference_map.shape != generated_map.shape:
            raise ValueError(
                f"maps for ({sample!r}, {k}) differ in shape: reference {tuple(reference_map.shape)} "
                f"vs generated {tuple(generated_map.shape)}"
            )
        tensors[_tensor_name(sample, k, REFERENCE_SUFFIX)] = reference_map.detach().to("cpu", torch.float16).contiguous()
        tensors[_tensor_name(sample, k, GENERATED_SUFFIX)] = generated_map.detach().to("cpu", torch.float16).contiguous()

    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)


class QualityMaps:
    """Read-only view of a `patch_quality.safetensors` file; tensors are read on demand."""

    def __init__(self, path: Path, metadata: dict[str, str], keys: list[tuple[str, int]]):
        self.path = path
        self.metadata = metadata
        self._keys = keys
        self._key_set = set(keys)
        self._handle: Any = None
        self._handle_pid: int | None = None

    @classmethod
    def load(cls, path: str | os.PathLike) -> QualityMaps:
        path = Path(path)
        if not path.is_file():
            raise BadInputError(f"quality-map file not found: {path}")
        try:
            with safe_open(str(path), framework="pt") as handle:
                metadata = dict(handle.metadata() or {})
                names = list(handle.keys())
        except Exception as error:  # safetensors raises its own error types for corrupt headers
            first_line = str(error).splitlines()[0] if str(error) else type(error).__name__
            raise BadInputError(f"{path} is not a readable safetensors file ({first_line})") from None
        if metadata.get(FORMAT_KEY) != FORMAT_VALUE:
            raise BadInputError(
                f"{path} is not a quality-map file: metadata {FORMAT_KEY!r} is {metadata.get(FORMAT_KEY)!r}, expected {FORMAT_VALUE!r}"
            )
        roles: dict[tuple[str, int], set[str]] = {}
        for name in names:
            match = _TENSOR_NAME.match(name)
            if match is None:
                raise BadInputError(f"{path} holds an unexpected tensor {name!r} (expected 'sample/k/reference_map|generated_map')")
            roles.setdefault((match["sample"], int(match["k"])), set()).add(match["role"])
        for key, present in roles.items():
            if present != {REFERENCE_SUFFIX, GENERATED_SUFFIX}:
                raise BadInputError(f"{path} has an incomplete pair for sample {key[0]!r} k={key[1]}: only {sorted(present)}")
        keys = sorted(roles, key=_sort_key)
        return cls(path, metadata, keys)

    def _open(self) -> Any:
        # A safe_open handle must not cross a fork: reopen in each process that reads.
        if self._handle is None or self._handle_pid != os.getpid():
            self._handle = safe_open(str(self.path), framework="pt")
            self._handle_pid = os.getpid()
        return self._handle

    def __getstate__(self) -> dict[str, Any]:
        state = self.__dict__.copy()
        state["_handle"] = None
        state["_handle_pid"] = None
        return state

    def get(self, sample: str, k: int) -> tuple[torch.Tensor, torch.Tensor]:
        """Return (reference_map, generated_map) as float32 (H, W) tensors."""
        if (sample, k) not in self._key_set:
            raise KeyError(f"no quality maps for sample {sample!r} k={k} in {self.path}")
        handle = self._open()
        reference_map = handle.get_tensor(_tensor_name(sample, k, REFERENCE_SUFFIX)).float()
        generated_map = handle.get_tensor(_tensor_name(sample, k, GENERATED_SUFFIX)).float()
        return reference_map, generated_map

    def shapes(self, sample: str, k: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
        """(reference, generated) map shapes from the file header, without reading the tensors."""
        handle = self._open()
        return tuple(tuple(handle.get_slice(_tensor_name(sample, k, role)).get_shape()) for role in (REFERENCE_SUFFIX, GENERATED_SUFFIX))

    def __contains__(self, key: object) -> bool:
        return key in self._key_set

    def keys(self) -> list[tuple[str, int]]:
        return list(self._keys)

    def __len__(self) -> int:
        return len(self._keys)

    def __getitem__(self, folder_idx: int) -> list[dict[str, torch.Tensor]]:
        """Reference-code view: `maps[i][k]["target_map" | "gene_map"]` for folder `sample{i}`."""
        sample = f"sample{folder_idx}"
        ks = sorted(k for s, k in self._keys if s == sample)
        if not ks:
            raise KeyError(f"no quality maps for folder index {folder_idx} (sample {sample!r}) in {self.path}")
        if ks != list(range(len(ks))):
            raise KeyError(f"quality maps for sample {sample!r} in {self.path} have non-contiguous k {ks}; use get(sample, k)")
        views = []
        for k in ks:
            reference_map, generated_map = self.get(sample, k)
            views.append({"target_map": reference_map, "gene_map": generated_map})
        return views


def _sort_key(key: tuple[str, int]) -> tuple[int, int | str, int]:
    sample, k = key
    match = re.fullmatch(r"sample(\d+)", sample)
    return (0, int(match.group(1)), k) if match else (1, sample, k)
