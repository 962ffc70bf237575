"""Text that becomes a file name (a prompt, a category) is checked before any model loads.

Prompts name the images in the official layouts (`DATA/sample{i}/{prompt}_gen_0.png`,
`OUT/{subject}/{prompt}.png`). A prompt the file system cannot store would otherwise fail at the
first save, after minutes of model loading, with a bare `OSError` and a half-made folder.
"""

from __future__ import annotations

NAME_MAX_BYTES = 255  # the longest file name of ext4, XFS, btrfs, NFS and APFS


def file_name_problem(text: str, suffix_bytes: int) -> str | None:
    """Why `text` + a suffix of `suffix_bytes` bytes cannot be one file name, or None if it can."""
    if not text:
        return "it is empty"
    if "\0" in text:
        return "it holds a NUL character"
    if "/" in text or "\\" in text:
        return "it holds a path separator"
    if text.startswith("."):
        return "it starts with '.' (a hidden file)"
    size = len(text.encode("utf-8", "surrogatepass")) + suffix_bytes
    if size > NAME_MAX_BYTES:
        return f"the file name would be {size} bytes, more than the {NAME_MAX_BYTES} file systems allow"
    return None
