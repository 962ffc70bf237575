"""Every training input checked before the first step, once.

Images are otherwise decoded lazily by the data loader and quality maps read on demand, so a
corrupt PNG failed mid-run (after checkpoints were written) and a NaN or out-of-range map silently
turned the loss and then every checkpoint into NaN. Here each image is decoded and each map is
checked to be finite and within its range; the first problem is one line naming the file, the
sample and the key.

Each pair's maps must also be the maps *of its images*: the maps file records the SHA-256 of the
reference and generated image every map was computed from (`patch_quality.store`), and each image's
digest is taken from the very bytes decoded here (no second read). Maps of another image (swapped
folders, an image regenerated after the maps, another DATA with the same sample names) are a
one-line error naming the sample, k, the image and the command that remakes the maps. A maps file
that records no digests is refused the same way rather than trusted with a warning: nothing could
then tell its maps from another DATA's, which is the silent failure the digests exist to stop, and
remaking (or reconverting) it is a single command.

The work is split over the processes (each checks its share, in the data-loader workers) and what
was verified is recorded in the output folder (`CHECKED_NAME`: each image's size, modification
time, inode and digest, the maps file's digest), so a resume or a second start decodes and hashes
only what changed. The inode makes a file moved in from elsewhere (swapped folders, a copy keeping
its times) count as changed.
"""

from __future__ import annotations

import json
import time
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import TYPE_CHECKING, Any

import torch
from torch.utils.data import DataLoader, Dataset
from tqdm.auto import tqdm

from common.distributed import gather_values
from common.errors import BadInputError
from common.images import load_rgb_image_and_sha256
from common.io import atomic_write_json
from patch_quality.store import GENERATED_SUFFIX, REFERENCE_SUFFIX, QualityMaps, remake_command

from .pair_dataset import TrainingPair

if TYPE_CHECKING:
    from accelerate import Accelerator


CHECKED_NAME = ".checked_inputs.json"


def map_ranges(quality_maps: QualityMaps) -> dict[str, tuple[float, float]]:
    """Allowed values per role: qualities lie in [0, 1]; `--signed` generated maps (metadata signed=true) in [-1, 1]."""
    signed = quality_maps.metadata.get("signed") == "true"
    return {REFERENCE_SUFFIX: (0.0, 1.0), GENERATED_SUFFIX: (-1.0, 1.0) if signed else (0.0, 1.0)}


def check_quality_map(quality_map: torch.Tensor, bounds: tuple[float, float], where: str) -> None:
    """`quality_map` is finite and within `bounds`; `where` names file, sample and key in the error."""
    finite = torch.isfinite(quality_map)
    if not finite.all():
        raise BadInputError(f"{where} holds {int((~finite).sum())} NaN/inf value(s)")
    low, high = quality_map.min().item(), quality_map.max().item()
    if low < bounds[0] or high > bounds[1]:
        raise BadInputError(f"{where} has values in [{low:g}, {high:g}], expected [{bounds[0]:g}, {bounds[1]:g}]")


@dataclass
class CheckedInputs:
    """What a start verified: each image's [size, mtime in ns, inode, sha256] and the map keys checked in the maps file of that digest."""

    images: dict[str, list[int | str]] = field(default_factory=dict)
    maps_sha256: str | None = None
    map_keys: list[list[Any]] = field(default_factory=list)
    error: str | None = None
    decoded: int = 0  # images decoded by this start (the others were unchanged since the recorded one)

    @classmethod
    def read(cls, path: Path) -> CheckedInputs:
        """The record of an earlier start (an unreadable or foreign one counts as none: everything is checked again)."""
        try:
            recorded = json.loads(path.read_text())
            return cls(recorded["images"], recorded["maps_sha256"], recorded["map_keys"])
        except (OSError, ValueError, KeyError, TypeError):
            return cls()

    def merge(self, others: Sequence[CheckedInputs]) -> CheckedInputs:
        merged = CheckedInputs(dict(self.images), self.maps_sha256)
        for other in others:
            merged.images.update(other.images)
        merged.map_keys = [list(key) for key in dict.fromkeys(tuple(key) for part in (self, *others) for key in part.map_keys)]
        return merged


def _stamp(path: Path) -> list[int]:
    status = path.stat()
    return [status.st_size, status.st_mtime_ns, status.st_ino]


class _Decode(Dataset):
    """Decodes and hashes one image per item (in the data-loader workers); returns its path, stamp + digest and the error if any."""

    def __init__(self, paths: Sequence[Path]) -> None:
        self.paths = list(paths)

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, index: int) -> tuple[str, list[int | str], str | None]:
        path = self.paths[index]
        stamp = _stamp(path)  # before the read: a file changed while being read gets another stamp next time
        try:
            _image, digest = load_rgb_image_and_sha256(path)
        except BadInputError as error:
            return str(path), [], str(error)
        return str(path), [*stamp, digest], None


def validate_training_inputs(
    pairs: Sequence[TrainingPair],
    quality_maps: QualityMaps | None,
    show_progress: bool = True,
    verified: CheckedInputs | None = None,
    maps_sha256: str | None = None,
    num_workers: int = 0,
) -> CheckedInputs:
    """Decode every image of `pairs` and check every quality map they use, skipping what `verified` shows unchanged.

    An image is skipped (its recorded digest reused) when an earlier start decoded it at the same
    size, modification time and inode; a pair's map values when the maps file has the digest
    (`maps_sha256`) they were checked in. Every pair's image digests are compared with the maps'
    at every start. The first problem is returned in `error` (not raised), so that the processes
    can stop together.
    """
    verified = verified or CheckedInputs()
    checked = CheckedInputs(maps_sha256=maps_sha256)
    if quality_maps is not None:
        checked.error = _unbound_maps_problem(quality_maps, pairs)
        if checked.error is not None:
            return checked
    images = list(dict.fromkeys(path for pair in pairs for path in (pair.reference_path, pair.generated_path)))
    _decode_changed(images, verified, checked, show_progress, num_workers)
    if checked.error is not None or quality_maps is None:
        return checked
    ranges = map_ranges(quality_maps)
    known = {tuple(key) for key in verified.map_keys} if verified.maps_sha256 == maps_sha256 and maps_sha256 is not None else set()
    for pair in pairs:
        checked.error = _other_images_problem(pair, quality_maps, checked.images)
        if checked.error is not None:
            return checked
        if (pair.sample, pair.generated_index) not in known:
            for role, quality_map in zip((REFERENCE_SUFFIX, GENERATED_SUFFIX), quality_maps.get(pair.sample, pair.generated_index)):
                where = f"{quality_maps.path}: sample {pair.sample!r} k={pair.generated_index} key '{pair.sample}/{pair.generated_index}/{role}'"
                try:
                    check_quality_map(quality_map, ranges[role], where)
                except BadInputError as error:
                    checked.error = str(error)
                    return checked
        checked.map_keys.append([pair.sample, pair.generated_index])
    return checked


def _decode_changed(images: Sequence[Path], verified: CheckedInputs, checked: CheckedInputs, show_progress: bool, num_workers: int) -> None:
    """Record every image's stamp and digest in `checked`: from `verified` when unchanged, else decoded and hashed now."""
    todo = []
    for path in images:
        recorded = verified.images.get(str(path))
        if recorded is not None and len(recorded) == 4 and recorded[:3] == _stamp(path):
            checked.images[str(path)] = recorded
        else:
            todo.append(path)
    checked.decoded = len(todo)
    loader = DataLoader(_Decode(todo), batch_size=None, num_workers=num_workers)
    for path, record, error in tqdm(loader, desc="checking training images", unit="image", disable=not show_progress or not todo):
        if error is not None:
            checked.error = error
            return
        checked.images[path] = record


def _data_root(pair: TrainingPair) -> Path:
    return pair.reference_path.parent.parent


def _unbound_maps_problem(quality_maps: QualityMaps, pairs: Sequence[TrainingPair]) -> str | None:
    """Why the maps file cannot be checked against its images (it records no digests, or unreadable ones), if it cannot."""
    try:
        if quality_maps.sources is not None or not pairs:
            return None
    except BadInputError as error:
        return str(error)
    return (
        f"{quality_maps.path} records no hashes of the images its maps were computed from (it predates binding maps to their images), "
        f"so nothing tells whether it describes the images of {_data_root(pairs[0])}; remake it: {remake_command(quality_maps, _data_root(pairs[0]))}"
    )


def _other_images_problem(pair: TrainingPair, quality_maps: QualityMaps, images: dict[str, list[int | str]]) -> str | None:
    """Whether `pair`'s maps were computed from another reference or generated image than the one at its path."""
    sources = quality_maps.sources[pair.sample]
    for role, path, expected in (
        ("reference", pair.reference_path, sources.reference),
        ("generated", pair.generated_path, sources.generated[pair.generated_index]),
    ):
        digest = images[str(path)][3]
        if digest != expected:
            return (
                f"{quality_maps.path}: the maps of sample {pair.sample!r} k={pair.generated_index} were computed from another {role} image than {path} "
                f"(maps: sha256 {expected[:12]}..., file now: sha256 {digest[:12]}...); remake them: {remake_command(quality_maps, _data_root(pair))}"
            )
    return None


def check_inputs_on_every_process(
    accelerator: Accelerator,
    pairs: Sequence[TrainingPair],
    quality_maps: QualityMaps | None,
    maps_sha256: str | None,
    output_dir: Path,
    num_workers: int,
) -> None:
    """Each process checks its share of `pairs`; all stop together on the first problem; the main process records what passed."""
    record = Path(output_dir) / CHECKED_NAME
    started = time.perf_counter()
    mine = validate_training_inputs(
        pairs[accelerator.process_index :: accelerator.num_processes],
        quality_maps,
        show_progress=accelerator.is_local_main_process,
        verified=CheckedInputs.read(record),
        maps_sha256=maps_sha256,
        num_workers=num_workers,
    )
    everyone = gather_values(accelerator, mine)
    errors = [checked.error for checked in everyone if checked.error is not None]
    if errors:
        raise BadInputError(errors[0])
    if accelerator.is_main_process:
        merged = everyone[0].merge(everyone[1:])
        atomic_write_json(record, {"images": merged.images, "maps_sha256": merged.maps_sha256, "map_keys": merged.map_keys})
        decoded = sum(checked.decoded for checked in everyone)
        print(
            f"training inputs checked in {time.perf_counter() - started:.2f} s on {accelerator.num_processes} process(es): "
            f"{decoded} image(s) decoded, {len(merged.images) - decoded} unchanged since the last start",
            flush=True,
        )
