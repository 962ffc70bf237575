"""Range checks for numeric flags and format templates, shared by every script.

A zero batch size, a NaN scale or a template with an unknown field otherwise surfaces as a
traceback deep inside a library, or worse, as a finished run of black images. Each check raises
`BadInputError` with one line naming the flag, what it must be and what it got.
"""

from __future__ import annotations

import math
import string
from collections.abc import Iterable

from common.errors import BadInputError


def require_in_range(flag: str, value: float | None, minimum: float | None = None, maximum: float | None = None) -> None:
    """`value` must be a finite number within [minimum, maximum] (None: that side is open); an unset (None) flag passes."""
    if value is None:
        return
    bounds = [f">= {minimum}" if minimum is not None else "", f"<= {maximum}" if maximum is not None else ""]
    expected = " and ".join([*(["finite"] if isinstance(value, float) else []), *filter(None, bounds)])
    if not math.isfinite(value) or (minimum is not None and value < minimum) or (maximum is not None and value > maximum):
        raise BadInputError(f"{flag} must be {expected}, got {value}")


def require_flags_in_range(config: object, names: Iterable[str], minimum: float | None = None, maximum: float | None = None) -> None:
    """`require_in_range` for each field `name` of a script's typed `config`, reported as its flag `--name`.

    A config's fields are named after the flags they come from (e.g. every batch size and resolution >= 1).
    """
    for name in names:
        require_in_range(f"--{name}", getattr(config, name), minimum, maximum)


def require_sampling_args(config: object) -> None:
    """The fields of `common.flags.add_sampling_args`' flags: steps and sizes >= 1, a finite guidance, sizes multiples of 8 (the VAE and UNet)."""
    require_flags_in_range(config, ("num_inference_steps", "height", "width"), minimum=1)
    require_flags_in_range(config, ("guidance_scale",))
    for name in ("height", "width"):
        if getattr(config, name) % 8:
            raise BadInputError(f"--{name} must be a multiple of 8 (the VAE and UNet need it), got {getattr(config, name)}")


def require_template_fields(flag: str, template: str, fields: Iterable[str]) -> None:
    """`template` is a `str.format` pattern that uses each of `fields` and nothing else."""
    fields = set(fields)
    try:
        used = {name for _, name, _, _ in string.Formatter().parse(template) if name is not None}
    except ValueError as error:
        raise BadInputError(f"{flag} {template!r}: not a format template ({error})") from None
    unknown = sorted(used - fields)
    if unknown:
        raise BadInputError(f"{flag} {template!r}: unknown field {{{unknown[0]}}}; only {sorted(fields)} can be filled in")
    missing = sorted(fields - used)
    if missing:
        raise BadInputError(f"{flag} {template!r} must contain {{{missing[0]}}}")
