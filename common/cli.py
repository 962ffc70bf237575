"""Command-line conventions shared by every script: boolean flags, counts, and the bad-input exit."""

from __future__ import annotations

import argparse
import contextlib
import copy
import dataclasses
import sys
from collections.abc import Iterator, Sequence
from typing import Any, NoReturn, TypeVar

from common.errors import ReportedError

Config = TypeVar("Config")


class DefaultsHelpFormatter(argparse.ArgumentDefaultsHelpFormatter):
    """`--help` shows every option's default, also of options without a help text.

    argparse's own formatter appends "(default: ...)" only to options that have a help string;
    required options and defaults of None (meaning "unset") are left without one.
    """

    def _get_help_string(self, action: argparse.Action) -> str:
        if action.required or action.default is None:
            return action.help or ""
        return super()._get_help_string(action)

    def _format_action(self, action: argparse.Action) -> str:
        if not action.help and action.option_strings and not action.required and action.default not in (None, argparse.SUPPRESS):
            # argparse expands (and so appends the default to) only non-empty help texts
            action = copy.copy(action)
            action.help = "(default: %(default)s)"
        return super()._format_action(action)


class ArgumentParser(argparse.ArgumentParser):
    """The scripts' parser: defaults in `--help`, and a bad value is one `prog: error: ...` line.

    argparse prints the whole usage (10+ lines for our scripts) above an error; the line itself is
    what a user needs, and the usage is one `--help` away.
    """

    def __init__(self, *positional: Any, **options: Any) -> None:
        options.setdefault("formatter_class", DefaultsHelpFormatter)
        super().__init__(*positional, **options)

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: error: {message} (see --help)\n")


def parse_config(parser: argparse.ArgumentParser, config_type: type[Config], argv: Sequence[str] | None = None) -> Config:
    """Parse `argv` into the script's typed settings, built once: one field per flag, named as its destination.

    The Namespace ends here; the packages get the config. A flag without a field, a field without a
    flag or another order (what `run_config.json` records follows it) is a TypeError: a bug in the
    script, not the user's input.
    """
    flags = vars(parser.parse_args(argv))
    names = [field.name for field in dataclasses.fields(config_type)]
    if list(flags) != names:
        raise TypeError(f"{config_type.__name__} fields {names} are not the flags of {parser.prog}, in order: {list(flags)}")
    return config_type(**flags)


def quiet_libraries() -> None:
    """Silence diffusers/transformers loading bars and info/warning lines (errors still show).

    Every model load otherwise prints bars and lines such as "should be kept in float32: []" that
    say nothing to a user; our own tqdm bars (steps, images) stay. Only libraries a script has
    already imported are touched, so this module never imports diffusers itself.
    """
    for name in ("diffusers", "transformers"):
        library = sys.modules.get(name)
        if library is not None:
            library.utils.logging.set_verbosity_error()
            library.utils.logging.disable_progress_bar()


def str2bool(value: str | bool) -> bool:
    """argparse type for the official scripts' `--flag True/False` style switches."""
    if isinstance(value, bool):
        return value
    lowered = value.strip().lower()
    if lowered in {"true", "1", "yes", "y", "t"}:
        return True
    if lowered in {"false", "0", "no", "n", "f"}:
        return False
    raise argparse.ArgumentTypeError(f"expected a boolean word (true/false), got {value!r}")


@contextlib.contextmanager
def exit_on_reported_error(program: str) -> Iterator[None]:
    """Turn a `ReportedError` (bad input, failed write, diverged run) into one `prog: error: ...` line and its exit code.

    A researcher launching a multi-GPU job wants the reason, not a traceback from every process.
    Only our own reported types are caught: any other exception is a bug and keeps its traceback.
    """
    try:
        yield
    except ReportedError as error:
        fail(program, error)


def fail(program: str, error: ReportedError) -> NoReturn:
    """Print argparse's `prog: error: message` line and exit with the error's code (argparse's 2 for bad input)."""
    print(f"{program}: error: {error}", file=sys.stderr)
    sys.exit(error.exit_code)
