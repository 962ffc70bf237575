"""Run the scripts' real `main`s under torchrun, recording what each rank does.

    ACCELERATE_USE_CPU=1 torchrun --nproc_per_node 2 -m tests.kit.torchrun_train SPEC.json

SPEC.json: {"record_dir": DIR, "runs": [{"name": NAME, "argv": [...], "script": MODULE?, ...}, ...]}.
Each run is `MODULE.main(argv)` (default `train_patchdpo`) in the launched processes, one after the
other in one process group (which saves the launch cost per run). Per run NAME, every rank writes to DIR/NAME/:

* `rank{r}/step{n}.safetensors`: its trainable weights after optimizer step n (a global
  optimizer-step hook, so nothing in the script is changed);
* `rank{r}.replaced`: one line per file or folder it moved into place (`os.replace`, which every
  atomic output write and the training-state rename end with);
* `done`: written by rank 0 when the run returned.

`kill`: [rank, step] SIGKILLs that rank right after that optimizer step (writing the time to
`rank{r}.killed` first): a run killed mid-training, after the checkpoints before that step.
`sigterm`: [rank, step] sends SIGTERM to that rank alone right after that optimizer step (a
preemption notice reaching one process); a run that exits (e.g. 75 after saving) writes its code to
`rank{r}.exit` and the launch goes on. `hide_resume_on_rank`: that rank finds no checkpoint to
resume from (a node that does not see the others' storage).
"""

from __future__ import annotations

import importlib
import json
import os
import signal
import sys
import time
from pathlib import Path

import torch
from accelerate.state import AcceleratorState
from safetensors.torch import save_file
from torch.distributed.tensor import DTensor
from torch.optim.optimizer import register_optimizer_step_post_hook

import patchdpo.resume


def replaced(record_dir: Path, name: str, ranks: int = 2) -> dict[int, list[str]]:
    """Per rank, the paths it moved into place during run `name` (read back from `rank{r}.replaced`)."""
    logs = {rank: Path(record_dir) / name / f"rank{rank}.replaced" for rank in range(ranks)}
    return {rank: log.read_text().splitlines() if log.exists() else [] for rank, log in logs.items()}


def main(spec_path: str) -> None:
    spec = json.loads(Path(spec_path).read_text())
    rank = int(os.environ["RANK"])
    state = {"dir": None, "step": 0, "kill": None, "sigterm": None}
    real_replace, real_find_resume = os.replace, patchdpo.resume.find_resume_checkpoint

    def recording_replace(src, dst, *args, **kwargs):
        real_replace(src, dst, *args, **kwargs)
        with open(state["dir"] / f"rank{rank}.replaced", "a") as log:
            log.write(f"{dst}\n")

    def record_step(optimizer: torch.optim.Optimizer, args, kwargs) -> None:
        state["step"] += 1
        params = [p for group in optimizer.param_groups for p in group["params"]]
        # a sharded run's parameters are DTensors: each rank records its own shard
        tensors = {str(i): (p.to_local() if isinstance(p, DTensor) else p).detach().cpu().clone() for i, p in enumerate(params)}
        save_file(tensors, str(state["dir"] / f"rank{rank}" / f"step{state['step']}.safetensors"))
        if state["kill"] == [rank, state["step"]]:
            (state["dir"] / f"rank{rank}.killed").write_text(str(time.time()))
            os.kill(os.getpid(), signal.SIGKILL)
        if state["sigterm"] == [rank, state["step"]]:
            os.kill(os.getpid(), signal.SIGTERM)

    os.replace = recording_replace
    # `end_training` would destroy the process group; the next run reuses it (re-creating a gloo group is flaky).
    keep_group = AcceleratorState.destroy_process_group
    AcceleratorState.destroy_process_group = lambda self, group=None: None
    register_optimizer_step_post_hook(record_step)
    for run in spec["runs"]:
        state.update(dir=Path(spec["record_dir"]) / run["name"], step=0, kill=run.get("kill"), sigterm=run.get("sigterm"))
        (state["dir"] / f"rank{rank}").mkdir(parents=True, exist_ok=True)
        hidden = run.get("hide_resume_on_rank") == rank
        patchdpo.resume.find_resume_checkpoint = (lambda *args: None) if hidden else real_find_resume
        AcceleratorState._reset_state()  # each run picks its own mixed precision; the process group (PartialState) stays
        try:
            importlib.import_module(run.get("script", "train_patchdpo")).main(run["argv"])
        except SystemExit as stopped:
            (state["dir"] / f"rank{rank}.exit").write_text(str(stopped.code))
            continue
        if rank == 0:
            (state["dir"] / "done").write_text("")
    keep_group(AcceleratorState())


if __name__ == "__main__":
    main(sys.argv[1])
