"""Atomic outputs, stable seeds and boolean flags shared by every script."""

from __future__ import annotations

import argparse
import os
import stat
import subprocess
import sys

import pytest
from PIL import Image

from common.cli import str2bool
from common.io import atomic_save_image, atomic_write, atomic_write_json
from common.seeds import stable_seed


def test_failed_write_keeps_the_old_file_and_leaves_no_temp(tmp_path) -> None:
    target = atomic_write_json(tmp_path / "scores.json", {"dino": 0.7})
    before = target.read_bytes()

    def crash(tmp):
        tmp.write_text('{"dino": 0.')
        raise KeyboardInterrupt

    with pytest.raises(KeyboardInterrupt):
        atomic_write(target, crash)
    assert target.read_bytes() == before
    assert [path.name for path in tmp_path.iterdir()] == ["scores.json"]


def test_outputs_get_the_usual_permissions(tmp_path) -> None:
    previous = os.umask(0o022)
    try:
        path = atomic_save_image(Image.new("RGB", (4, 4)), tmp_path / "image.png")
    finally:
        os.umask(previous)
    assert stat.S_IMODE(path.stat().st_mode) == 0o644
    assert Image.open(path).size == (4, 4)


def test_stable_seed_is_the_same_in_another_process() -> None:
    code = "from common.seeds import stable_seed; print(stable_seed(42, 'dog', 'a dog in the jungle'))"
    other = subprocess.run(
        [sys.executable, "-c", code], capture_output=True, text=True, check=True, env={**os.environ, "PYTHONHASHSEED": "random"}
    )
    assert int(other.stdout) == stable_seed(42, "dog", "a dog in the jungle")
    assert stable_seed(42, "dog", "a") != stable_seed(42, "dog", "b") and 0 <= stable_seed(1) < 2**63


@pytest.mark.parametrize(("word", "value"), [("True", True), ("false", False), ("1", True), ("no", False)])
def test_str2bool(word, value) -> None:
    assert str2bool(word) is value


def test_str2bool_rejects_other_words() -> None:
    with pytest.raises(argparse.ArgumentTypeError, match="maybe"):
        str2bool("maybe")
