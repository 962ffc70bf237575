"""The one exception type for bad user input.

Input checks raise `BadInputError` with one line naming the path, key or flag and what was
expected; only the scripts catch it (see `common.cli.exit_on_bad_input`). It subclasses
`ValueError` so that library callers who catch `ValueError` keep working.
"""


class BadInputError(ValueError):
    """A user-supplied file, folder, flag or value is not what the program needs."""
