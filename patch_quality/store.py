"""The one reader and writer of `patch_quality.safetensors`.

Each (sample folder, k) pair holds two maps at the latent grid: the reference map (how well each
reference patch is reproduced in generated image k) and the generated map (how faithful each patch
of generated image k is to the reference). Training weights the reference half of a pair by
`1 - reference_map` and the generated half by `generated_map`.

The file is plain safetensors (no pickle), float16 tensors named
`{sample}/{k}/reference_map` and `{sample}/{k}/generated_map`, plus string metadata describing how
the maps were made. float16 (the official pickle holds float32) halves the file and moves a weight
by at most 2^-12, which changes the loss by < 1e-5 and its gradient by < 3e-4 relative, less than
fp16 autocast rounds (`benchmarks/map_precision.py`, README "float16 is enough"). Reading is lazy (memory-mapped per process) so a dataset holding a
`QualityMaps` can be forked into DataLoader workers without copying every map.

Maps are bound to the images they describe: metadata `SOURCES_KEY` holds the SHA-256 of the
reference and of each generated image file every map was computed from (`SampleImages`), so
training can tell maps of other images (a swapped folder, a regenerated image, another DATA with
the same sample names) from the right ones by content, not by name. Files of format
`LEGACY_FORMAT_VALUE` predate this and record no hashes: they still load (e.g. for `visualize`),
with `sources` None, and training refuses them (`patchdpo.validate_inputs`).

Equal maps, metadata and sources give equal bytes: the training run records the maps file's
digest and a resume refuses another one, so rerunning the maps on unchanged data must not look
like a change.

The official code indexes its pickle as `all_region_maps[folder_idx][k]` with keys `target_map`
(reference image) and `gene_map` (generated image); `QualityMaps[folder_idx]` exposes the same view,
folder index `i` meaning the folder `sample{i}`, so a converted official file and one of ours read
the same way.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Iterable, Mapping
from dataclasses import dataclass
from functools import cached_property
from pathlib import Path
from typing import Any

import torch
from safetensors import safe_open
from safetensors.torch import save_file

from common.errors import BadInputError
from common.io import atomic_path, sha256_file
from patch_quality import layout
from patch_quality.cli import maps_parser

FORMAT_KEY = "format"
FORMAT_VALUE = "patchdpo-quality-maps/2"
LEGACY_FORMAT_VALUE = "patchdpo-quality-maps/1"  # no SOURCES_KEY: not bound to its images
SOURCES_KEY = "source_images_sha256"
REFERENCE_SUFFIX = "reference_map"
GENERATED_SUFFIX = "generated_map"

_TENSOR_NAME = re.compile(r"^(?P<sample>[^/]+)/(?P<k>\d+)/(?P<role>reference_map|generated_map)$")


_SHA256 = re.compile(r"^[0-9a-f]{64}$")


@dataclass(frozen=True)
class SampleImages:
    """SHA-256 (hex) of the image files one sample's maps were computed from: its reference and generated image k."""

    reference: str
    generated: Mapping[int, str]

    def to_json(self, ks: Iterable[int]) -> dict[str, Any]:
        return {"reference": self.reference, "generated": {str(k): self.generated[k] for k in sorted(ks)}}

    @classmethod
    def from_json(cls, value: Any) -> SampleImages:
        """Raises ValueError on anything but `to_json`'s shape with 64-hex digests."""
        if not isinstance(value, dict) or set(value) != {"reference", "generated"} or not isinstance(value["generated"], dict):
            raise ValueError(f"expected {{'reference': sha256, 'generated': {{k: sha256}}}}, got {str(value)[:80]}")
        digests = [value["reference"], *value["generated"].values()]
        if not all(isinstance(digest, str) and _SHA256.match(digest) for digest in digests):
            raise ValueError("an image digest is not a SHA-256 hex string")
        return cls(value["reference"], {int(k): digest for k, digest in value["generated"].items()})


def hash_sample_images(reference: Path, generated: Mapping[int, Path]) -> SampleImages:
    return SampleImages(sha256_file(reference), {k: sha256_file(path) for k, path in generated.items()})


def hash_data_images(data_root: str | os.PathLike, keys: Iterable[tuple[str, int]]) -> dict[str, SampleImages]:
    """The digests of DATA's images behind each (sample, k) of `keys`, for files written without computing the maps here.

    A sample folder or generated image k that DATA lacks is a one-line error.
    """
    wanted: dict[str, list[int]] = {}
    for sample, k in keys:
        wanted.setdefault(sample, []).append(k)
    sources = {}
    for sample, ks in wanted.items():
        prompt, reference, generated = layout.sample_files(Path(data_root) / sample)
        missing = sorted(set(ks) - set(generated))
        if missing:
            raise BadInputError(f"{Path(data_root) / sample} has no generated image '{prompt}_gen_{missing[0]}.png' (k={missing[0]})")
        sources[sample] = hash_sample_images(reference, {k: generated[k] for k in ks})
    return sources


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
    sources: Mapping[str, SampleImages],
) -> None:
    """Write every (reference_map, generated_map) pair as float16, bound to `sources`, atomically.

    Maps must be finite 2-D tensors and both maps of a pair must share one (H, W): they weight the
    two halves of the same latent batch. `sources[sample]` must name the images of every (sample, k)
    written; only those digests are stored.
    """
    meta: dict[str, str] = {}
    for name, value in metadata.items():
        if not isinstance(name, str) or not isinstance(value, str):
            raise ValueError(f"quality-map metadata must map str to str, got {name!r}: {value!r}")
        if name in (FORMAT_KEY, SOURCES_KEY):
            raise ValueError(f"quality-map metadata key {name!r} is reserved")
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

    meta[SOURCES_KEY] = _sources_json(maps.keys(), sources)
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp), metadata=meta)
        _sort_header_metadata(tmp)


def _sources_json(keys: Iterable[tuple[str, int]], sources: Mapping[str, SampleImages]) -> str:
    ks: dict[str, list[int]] = {}
    for sample, k in keys:
        if sample not in sources or k not in sources[sample].generated:
            raise ValueError(f"no image digests for the quality maps of ({sample!r}, {k}): maps must be bound to their images")
        ks.setdefault(sample, []).append(k)
    return json.dumps({sample: sources[sample].to_json(ks[sample]) for sample in ks}, sort_keys=True, separators=(",", ":"))


def _sort_header_metadata(path: Path) -> None:
    """Rewrite the safetensors header in place with its metadata sorted by key.

    safetensors writes metadata in hash-map order, which changes from process to process; tensor
    entries are already sorted. The sorted header is the same JSON with the same escapes, so it has
    the same length and the tensor data does not move.
    """
    with open(path, "r+b") as handle:
        size = int.from_bytes(handle.read(8), "little")
        header = json.loads(handle.read(size))
        header["__metadata__"] = dict(sorted(header["__metadata__"].items()))
        text = json.dumps(header, separators=(",", ":"), ensure_ascii=False).encode()
        if len(text) > size:
            raise RuntimeError(f"sorted safetensors header of {path} is {len(text)} bytes, longer than the {size} written")
        handle.seek(8)
        handle.write(text.ljust(size))


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
        if metadata.get(FORMAT_KEY) not in (FORMAT_VALUE, LEGACY_FORMAT_VALUE):
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
        state.pop("sources", None)  # parsed again on demand: data-loader workers never need it
        return state

    @cached_property
    def sources(self) -> dict[str, SampleImages] | None:
        """Per sample, the digests of the images the maps were computed from; None for a file that records none.

        Parsed on first use, not by `load`: only training's start-up check needs it.
        """
        if self.metadata[FORMAT_KEY] == LEGACY_FORMAT_VALUE:
            return None
        try:
            recorded = json.loads(self.metadata[SOURCES_KEY])
            sources = {sample: SampleImages.from_json(value) for sample, value in recorded.items()}
        except (KeyError, ValueError, TypeError, AttributeError) as error:
            raise BadInputError(f"{self.path}: unreadable image digests in metadata {SOURCES_KEY!r} ({error})") from None
        for sample, k in self._keys:
            if sample not in sources or k not in sources[sample].generated:
                raise BadInputError(f"{self.path} records no image digests for sample {sample!r} k={k}; remake the file")
        return sources

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


_RECORDED_FLAGS = (
    ("--backbone", "backbone"),
    ("--finetuned", "finetuned"),
    ("--layer", "layer"),
    ("--image_size", "feature_image_size"),
    ("--resolution", "resolution"),
)
_SETTING_FLAGS = (
    "transform",
    "good_threshold",
    "signed",
    "foreground_mask",
    "background_level",
    "foreground_fraction",
    "mask_reference_background",
)


def remake_command(quality_maps: QualityMaps, data_root: str | os.PathLike) -> str:
    """The command that writes `quality_maps` again for the images now in `data_root`, from what its metadata records.

    A file converted from the official pickle names its conversion; any other the maps CLI with its
    recorded backbone, layer, image size, resolution and the map settings that differ from the
    defaults. The model training uses is not recorded: it stays a placeholder.
    """
    metadata, path, data_root = quality_maps.metadata, str(quality_maps.path), str(data_root)
    if "source_file" in metadata:
        return shlex.join(["python", "-m", "patch_quality.convert_pkl", metadata["source_file"], path, "--data_root", data_root])
    flags = {"--backbone": "BACKBONE"}
    for flag, key in _RECORDED_FLAGS:
        if metadata.get(key):
            flags[flag] = metadata[key]
    parser = maps_parser()
    for name in _SETTING_FLAGS:
        value = _recorded_value(metadata.get(name, "null"))
        if value is not None and value != parser.get_default(name):
            flags[f"--{name}"] = str(value)
    if Path(path) != Path(data_root) / layout.QUALITY_MAPS_NAME:
        flags["--output"] = path
    words = shlex.join(["--data_root", data_root, *(word for item in flags.items() for word in item)])
    return f"python -m patch_quality.maps {words} --base_model_path <--pretrained_model_name_or_path>" + (
        "" if "--resolution" in flags else " --resolution <--resolution>"
    )


def _recorded_value(text: str) -> Any:
    try:
        return json.loads(text)
    except ValueError:
        return text  # `transform` is stored as the bare word


def _sort_key(key: tuple[str, int]) -> tuple[int, int | str, int]:
    sample, k = key
    match = re.fullmatch(r"sample(\d+)", sample)
    return (0, int(match.group(1)), k) if match else (1, sample, k)
