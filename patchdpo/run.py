"""The training run with its robustness around the loop: launch and precision checks, where a resume starts, the
output-folder lock, stop signals (save, then exit 75), the last checkpoint and where everything went."""

from __future__ import annotations

import logging
from pathlib import Path

from accelerate import Accelerator
from accelerate.utils import ProjectConfiguration

from common.distributed import owning_output_dir, process_group_kwargs
from common.launch import check_launch, check_mixed_precision
from common.outputs import check_output_dir
from common.stop_signals import STOPPED_EXIT_CODE, StopSignals
from common.trackers import check_report_to, logs_description

from .config import TrainingConfig
from .loop import ValidationFactory, set_up, train
from .models import save_adapter_checkpoint
from .resume import TRACKER_PROJECT, resolve_start


def run_training(config: TrainingConfig, prog: str, make_validation: ValidationFactory | None = None) -> int:
    """Check the launch, set up, train until `--stop_step` / the epoch cap (or a stop signal), save; the exit code."""
    check_output_dir(config.output_dir)  # the flags were checked when the script built `config`
    if config.cache_dir is not None:
        check_output_dir(config.cache_dir, "--cache_dir")
    accelerator = create_accelerator(config)
    check_launch(accelerator.num_processes, prog)
    check_mixed_precision(accelerator.mixed_precision, accelerator.device.type)
    resume = resolve_start(config, accelerator)
    with owning_output_dir(accelerator, config.output_dir):
        run = set_up(config, accelerator, resume, make_validation)
        with StopSignals() as signals:
            stopped = train(run, signals)
        if run.last_saved != run.global_step:
            trained = run.gathered.gather() if run.gathered is not None else None  # a sharded run gathers on every process
            if accelerator.is_main_process:
                save_adapter_checkpoint(run.checkpoint_dir(), run.models.model, trained)
    output_dir = Path(config.output_dir).resolve()
    logs = logs_description([tracker.name for tracker in accelerator.trackers], output_dir / config.logging_dir, TRACKER_PROJECT)
    accelerator.print(f"adapter checkpoints: {output_dir}/checkpoint-*/{run.models.model.adapter.checkpoint_files[0]}{logs}")
    accelerator.end_training()
    if not stopped:
        return 0
    accelerator.print(
        f"stopped by {signals.received or 'a stop signal on another process'} after step {run.global_step}: its training state is in "
        f"{run.checkpoint_dir()}; continue with the same command and --resume_from_checkpoint latest"
    )
    return STOPPED_EXIT_CODE


def create_accelerator(config: TrainingConfig) -> Accelerator:
    output_dir = Path(config.output_dir)
    check_report_to(config.report_to)
    accelerator = Accelerator(
        mixed_precision=config.mixed_precision,
        gradient_accumulation_steps=config.gradient_accumulation_steps,
        log_with=config.report_to,
        project_config=ProjectConfiguration(project_dir=str(output_dir), logging_dir=str(output_dir / config.logging_dir)),
        kwargs_handlers=[process_group_kwargs(config.ddp_timeout)],
    )
    logging.basicConfig(format="%(asctime)s %(levelname)s %(name)s: %(message)s", level=logging.INFO)
    return accelerator
