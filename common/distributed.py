"""What every process of a (possibly multi-node) launch must agree on, checked instead of assumed.

Multi-node runs fail by storage and agreement, not by maths: a node whose `--output_dir` is a
local disk finds no checkpoint on resume and starts from step 0 while the others resume, and the
run hangs in the first collective where their step counts differ. These checks compare what each
process sees and stop every process with the same one-line error instead. A process that dies
makes the others fail in their next collective, bounded by the process-group timeout
(`--ddp_timeout`, `process_group_kwargs`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Callable, Iterator
from datetime import timedelta
from pathlib import Path
from typing import TYPE_CHECKING, Any, TypeVar

from common.cli import exit_on_reported_error, quiet_libraries
from common.errors import BadInputError, ReportedError
from common.run_lock import LOCK_NAME, holding_output_dir

if TYPE_CHECKING:
    from accelerate import Accelerator, PartialState
    from accelerate.utils import InitProcessGroupKwargs

    Processes = Accelerator | PartialState  # either: both know their rank, gather and wait

Config = TypeVar("Config")  # a script's typed settings (e.g. `dreambench.config.InferenceConfig`)

SHARED_STORAGE_FIX = "put it on storage every node shares (NFS, Lustre, a bucket mount) and pass the same absolute path on every node"


def process_group_kwargs(timeout_s: float) -> InitProcessGroupKwargs:
    """accelerate's handler setting the process-group timeout (`--ddp_timeout`)."""
    from accelerate.utils import InitProcessGroupKwargs

    return InitProcessGroupKwargs(timeout=timedelta(seconds=timeout_s))


def gather_values(accelerator: Processes, value: Any) -> list[Any]:
    """Every process's `value`, in rank order, on every process."""
    if accelerator.num_processes == 1:
        return [value]
    from accelerate.utils import gather_object

    return gather_object([value])


def require_agreement(accelerator: Processes, value: Any, describe: Callable[[list[Any]], str]) -> None:
    """Raise the same `BadInputError(describe(values))` on every process unless every process holds the same `value`."""
    values = gather_values(accelerator, value)
    if any(other != values[0] for other in values):
        raise BadInputError(describe(values))


def _read_text(path: Path) -> str | None:
    try:
        return path.read_text()
    except OSError:
        return None


def check_file_is_shared(accelerator: Processes, path: str | os.PathLike, flag: str) -> None:
    """Every process sees the file the main process wrote before the last collective (e.g. the run's lock), with the same content.

    A folder on a node-local disk fails here, at start-up, on every process, before anything is trained.
    """
    path = Path(path)

    def describe(seen: list[str | None]) -> str:
        blind = [rank for rank, text in enumerate(seen) if text != seen[0]]
        return (
            f"{flag} {path.parent} is not the same folder on every node (process(es) {blind} do not see {path.name} written by "
            f"process 0): {SHARED_STORAGE_FIX}"
        )

    require_agreement(accelerator, _read_text(path), describe)


@contextlib.contextmanager
def owning_output_dir(accelerator: Processes, folder: str | os.PathLike, flag: str = "--output_dir") -> Iterator[None]:
    """The main process owns `folder` for the block (`common.run_lock`) and every process checks it sees that same folder.

    A folder another run holds is refused on every process at once: the others never wait in a
    collective for a main process that has already stopped.
    """
    with contextlib.ExitStack() as held:
        check_on_main(accelerator, lambda: held.enter_context(holding_output_dir(folder, flag=flag)))  # also orders the lock's write
        check_file_is_shared(accelerator, Path(folder) / LOCK_NAME, flag)
        yield


def check_on_main(accelerator: Processes, check: Callable[[], object]) -> None:
    """Run `check` on the main process only and raise its refusal (a `ReportedError`) on every process, which all wait for it.

    For what only the main process uses (the metric models of a run's final scores, the folder's
    lock): the others never wait in a collective for a main process that has already stopped.
    """
    refusal = None
    if accelerator.is_main_process:
        try:
            check()
        except ReportedError as error:
            refusal = error
    main_refusal = gather_values(accelerator, None if refusal is None else str(refusal))[0]
    if refusal is not None:
        raise refusal
    if main_refusal is not None:
        raise BadInputError(main_refusal)


def launch_run(
    program: str, config: Config, run: Callable[[Config, Accelerator, contextlib.ExitStack], Any], ddp_timeout: float
) -> Accelerator:
    """The `main` of a script that generates on every process: quiet libraries, an Accelerator with `--ddp_timeout`,
    a reported error as one line, and what `run` claims into the stack (its output folder) held until it returns."""
    from accelerate import Accelerator

    quiet_libraries()
    accelerator = Accelerator(kwargs_handlers=[process_group_kwargs(ddp_timeout)])
    with exit_on_reported_error(program), contextlib.ExitStack() as held:
        run(config, accelerator, held)
    return accelerator
