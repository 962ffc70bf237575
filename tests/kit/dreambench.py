"""Where the tests find DreamBench: `../shared/dreambench` next to the repository (the project's one location)."""

from __future__ import annotations

from pathlib import Path

DREAMBENCH_ROOT = Path(__file__).resolve().parents[2].parent / "shared" / "dreambench"


def dreambench_dataset() -> Path:
    """The `dataset/` folder; a missing copy fails the test that needs it instead of skipping its check."""
    dataset = DREAMBENCH_ROOT / "dataset"
    assert dataset.is_dir(), f"DreamBench not found at {dataset}: the tests need ../shared/dreambench next to the repository"
    return dataset
