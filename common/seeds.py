"""Seeds that are a function of what a sample is, the same in every process and Python run."""

from __future__ import annotations

import hashlib


def stable_seed(*parts: object) -> int:
    """A 63-bit seed derived from `parts` that is the same in every process and Python run.

    Python's `hash()` of a string is salted per process, so seeding from it would make images depend
    on which worker generated them; sha256 of the parts' text does not.
    """
    text = "\x1f".join(str(part) for part in parts)
    return int.from_bytes(hashlib.sha256(text.encode("utf-8")).digest()[:8], "big") >> 1
