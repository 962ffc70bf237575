"""The errors a script reports in one line instead of a traceback.

`ReportedError` is the base: the scripts catch it (and only it, see `common.cli.exit_on_reported_error`),
print `prog: error: message` and exit with its `exit_code`. Its kinds:

* `BadInputError` (exit 2): an input check failed — one line naming the path, key or flag and what
  was expected. It subclasses `ValueError` so that library callers who catch `ValueError` keep working.
* `WriteError` (exit 2): an output could not be written (no space, file too large, name too long,
  permission) — one line naming the file and the cause; what was written before it stays intact.

Any other exception is a bug and keeps its traceback.
"""


class ReportedError(Exception):
    """An error whose message is the whole story: printed as one line, the process exits with `exit_code`."""

    exit_code = 2


class BadInputError(ReportedError, ValueError):
    """A user-supplied file, folder, flag or value is not what the program needs."""


class WriteError(ReportedError, OSError):
    """An output file or folder could not be written; the message names it and the cause."""
