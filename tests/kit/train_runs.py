"""The training runs each family's `tests/test_train_*.py` makes the same way: stopped by SIGTERM, or launched under torchrun.

Every family checks that a SIGTERM saves the step and the resumed run equals an uninterrupted one, and that two processes
(also with `--shard_base`) train the one-process adapter. How the signal is sent and how torchrun is launched are the same
for every family, so they live here once; the tests keep what they assert about the checkpoints and adapters.
"""

from __future__ import annotations

import contextlib
import io
import json
import os
import signal
import subprocess
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
from accelerate.state import AcceleratorState

import train_patchdpo
from patchdpo import method as method_module

REPO = Path(__file__).resolve().parents[2]


def train_with_own_precision(argv: Sequence[str]) -> None:
    """`train_patchdpo.main(argv)` in an Accelerate state of its own.

    Accelerate keeps the first run's mixed precision for the whole process, so a run with another `--mixed_precision`
    (bf16 among fp32 runs) needs the state reset before it and again after it, for the runs that follow.
    """
    AcceleratorState._reset_state(reset_partial_state=True)
    try:
        train_patchdpo.main(list(argv))
    finally:
        AcceleratorState._reset_state(reset_partial_state=True)


def train_stopped_by_sigterm(monkeypatch: pytest.MonkeyPatch, argv: Sequence[str]) -> int | str | None:
    """`train_patchdpo.main(argv)` with SIGTERM sent to this process in the middle of step 2; the code it exits with.

    The signal arrives inside the second `compute_loss` call (between forward and backward), where a preemption
    notice lands in a real run. Fails unless the run exits; the script's messages are swallowed, and the real
    `compute_loss` is back in place when this returns.
    """
    real, calls = method_module.compute_loss, []

    def signalled(*args: Any, **kwargs: Any) -> Any:
        calls.append(1)
        if len(calls) == 2:
            os.kill(os.getpid(), signal.SIGTERM)
        return real(*args, **kwargs)

    monkeypatch.setattr(method_module, "compute_loss", signalled)
    with pytest.raises(SystemExit) as raised, contextlib.redirect_stderr(io.StringIO()), contextlib.redirect_stdout(io.StringIO()):
        train_patchdpo.main(list(argv))
    monkeypatch.setattr(method_module, "compute_loss", real)
    return raised.value.code


def launch_under_torchrun(runs: list[dict[str, Any]], work: Path, timeout: float) -> subprocess.CompletedProcess[str]:
    """`runs` (`tests.kit.torchrun_train`'s spec) one after the other in one 2-process CPU launch; the finished launch.

    The spec goes to `work/spec.json` and the ranks' records to `work/record`. One launch for all runs saves
    torchrun's start-up cost per run.
    """
    (work / "spec.json").write_text(json.dumps({"record_dir": str(work / "record"), "runs": runs}))
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1"}
    command = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node", "2", "-m", "tests.kit.torchrun_train"]
    return subprocess.run([*command, str(work / "spec.json")], cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)
