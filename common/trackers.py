"""`--report_to`: the experiment trackers a run logs to, checked before anything loads.

accelerate only logs a debug line when a named tracker's package is missing and trains on without
it, so a run meant for wandb finished with no logs anywhere and a last line pointing at TensorBoard
logs that were never written. Here a tracker that is not installed (or not known to accelerate) is
one line naming the `pip install` or the valid names, before any model loads; and the run names
only the logs of the trackers it used.

accelerate is imported inside the functions: the scripts import this module while building their
parsers, and `--help` must not pay for it.
"""

from __future__ import annotations

from collections.abc import Iterable
from pathlib import Path

from common.errors import BadInputError

ALL = "all"


def check_report_to(value: str, flag: str = "--report_to") -> list[str]:
    """The trackers `value` names (`all`: every installed one), each installed; else one line naming the fix."""
    from accelerate.tracking import get_available_trackers
    from accelerate.utils import LoggerType

    installed = [str(tracker.value) for tracker in get_available_trackers()]
    if value == ALL:
        return installed
    known = [str(tracker.value) for tracker in LoggerType if tracker != LoggerType.ALL]
    if value not in known:
        raise BadInputError(f"{flag} {value}: not a tracker accelerate knows; pass one of {', '.join(known)} or {ALL}")
    if value not in installed:
        instead = f", or pass {flag} {installed[0]}" if installed else ""
        raise BadInputError(f"{flag} {value}: the {value} package is not installed: pip install {value}{instead}")
    return [value]


def logs_description(trackers: Iterable[str], logging_dir: str | Path, project: str) -> str:
    """Where each tracker the run used put its logs, for the run's last line ('' when it used none)."""
    return "".join(
        f", TensorBoard logs: {logging_dir}" if tracker == "tensorboard" else f", {tracker} logs: project {project!r}"
        for tracker in trackers
    )
