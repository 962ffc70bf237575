"""Booby-trapped files: pickles whose unpickling creates a marker file, to prove a loader never runs them."""

from __future__ import annotations

import pickle
from pathlib import Path

import torch


class CodeOnUnpickle:
    """Unpickling this runs `open(marker, "w")`: the marker file exists iff some loader executed pickled code."""

    def __init__(self, marker: Path) -> None:
        self.marker = Path(marker)

    def __reduce__(self):
        return exec, (f"open({str(self.marker)!r}, 'w').close()",)


def plant_pickle(path: Path, marker: Path, torch_archive: bool = True) -> Path:
    """Write a code-running pickle at `path`: a torch archive (what `torch.load` reads) or a bare pickle stream."""
    path.parent.mkdir(parents=True, exist_ok=True)
    payload = {"state": CodeOnUnpickle(marker)}
    if torch_archive:
        torch.save(payload, path)
    else:
        path.write_bytes(pickle.dumps(payload))
    return path
