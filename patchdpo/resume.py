"""Where a run starts: the checked training state `--resume_from_checkpoint` names (or step 0), agreed by every process.

Decided before the output folder is claimed or any model loads, so a refused start leaves every
file as it was.
"""

from __future__ import annotations

from pathlib import Path

from accelerate import Accelerator
from accelerate.logging import get_logger

from common.checkpoints import checkpoint_dirs, checkpoint_step, find_resume_checkpoint, listing, refuse_earlier_run, state_fingerprint
from common.distributed import SHARED_STORAGE_FIX, require_agreement
from common.errors import BadInputError
from common.training_state import CheckedState

from .config import TrainingConfig
from .optimization import StepPlan

logger = get_logger(__name__)

#: The TensorBoard project: the run's logs are `<output_dir>/<logging_dir>/patchdpo`.
TRACKER_PROJECT = "patchdpo"


def tracker_logs(config: TrainingConfig) -> Path:
    """This run's TensorBoard folder: what a start over (`--overwrite_output_dir`) removes next to the checkpoints."""
    return Path(config.output_dir) / config.logging_dir / TRACKER_PROJECT


def resolve_start(config: TrainingConfig, accelerator: Accelerator) -> CheckedState | None:
    """Where this run starts: the checked state `--resume_from_checkpoint` names, or None (step 0); agreed by every process.

    Decided before the folder is claimed or any model loads, so a refused start leaves every file as it
    was. Refused in one line: a fresh start (neither flag) into the folder of an earlier run, whose
    checkpoints and logs it would mix with its own; a state that does not check out or does not exist;
    a `--stop_step` that leaves nothing to train; a state from another folder into an earlier run's.
    """
    resume, refusal = None, None
    try:
        if config.resume_from_checkpoint:
            resume = find_resume_checkpoint(config.output_dir, config.resume_from_checkpoint)
        fresh = not (config.resume_from_checkpoint or config.overwrite_output_dir)
        foreign = resume is not None and resume.directory.resolve().parent != Path(config.output_dir).resolve()
        if fresh or foreign:
            refuse_earlier_run(config.output_dir, [tracker_logs(config)])
    except BadInputError as error:
        refusal = str(error)
    agree_on_resume_state(accelerator, resume, refusal)
    if resume is None:
        if config.resume_from_checkpoint:
            logger.info(f"no checkpoint in {config.output_dir}: starting from step 0", main_process_only=True)
        return None
    if config.stop_step <= resume.step:
        raise BadInputError(
            f"--resume_from_checkpoint {config.resume_from_checkpoint}: {resume.directory} was saved after step {resume.step} and "
            f"--stop_step {config.stop_step} leaves nothing to train; pass a --stop_step above {resume.step} to continue"
        )
    later = [path.name for path in checkpoint_dirs(config.output_dir) if checkpoint_step(path) > resume.step]
    if later:
        logger.warning(f"resuming after step {resume.step}: {listing(later)}, saved after it, will be overwritten", main_process_only=True)
    return resume


def agree_on_resume_state(accelerator: Accelerator, resume: CheckedState | None, refusal: str | None = None) -> None:
    """Every process resumes from the same step of the same state, or every process stops with one line (never a hang)."""
    if refusal is not None:
        mine = {"refused": refusal}
    else:
        mine = None if resume is None else {"step": resume.step, "files": state_fingerprint(resume.state_dir)}

    def describe(seen: list) -> str:
        found = [("no state" if s is None else "refused" if "refused" in s else f"step {s['step']}") for s in seen]
        steps = ", ".join(f"process {rank}: {what}" for rank, what in enumerate(found))
        return f"the processes found different training states to resume from ({steps}); --output_dir: {SHARED_STORAGE_FIX}"

    require_agreement(accelerator, mine, describe)
    if refusal is not None:
        raise BadInputError(refusal)


def check_steps_left(config: TrainingConfig, plan: StepPlan, resume: CheckedState | None) -> None:
    """A resume whose epoch cap ends at or before the saved step trains nothing: one line (`--stop_step` is checked before loading)."""
    if resume is not None and plan.total_steps <= resume.step:
        raise BadInputError(
            f"{resume.directory} was saved after step {resume.step} and the epoch cap ends training at step {plan.total_steps} "
            f"(--num_train_epochs {config.num_train_epochs} x {plan.steps_per_epoch} steps per epoch): nothing to train; "
            "raise --num_train_epochs to continue"
        )
