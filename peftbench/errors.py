"""The one exception users see: a one-line message naming the bad value and the fix."""

from __future__ import annotations

import difflib
import errno
from collections.abc import Iterable, Iterator
from contextlib import contextmanager


class UserError(Exception):
    """Bad input (config value, data file, model source). The CLI prints it as one line, no traceback."""


def choice_error(what: str, value: object, choices: Iterable[str]) -> UserError:
    """`unknown task 'sst3' (did you mean 'sst2'?); choose from: cola, mnli, ...`"""
    choices = sorted(choices)
    close = difflib.get_close_matches(str(value), choices, n=3, cutoff=0.5)
    hint = f" (did you mean {' or '.join(repr(c) for c in close)}?)" if close else ""
    return UserError(f"unknown {what} {value!r}{hint}; choose from: {', '.join(choices)}")


def require(ok: bool, message: str) -> None:
    if not ok:
        raise UserError(message)


def disk_full(e: BaseException) -> bool:
    """ENOSPC as Python raises it (OSError) or as safetensors' Rust writer does: SafetensorError('Error while
    serializing: I/O error: No space left on device (os error 28)')."""
    if isinstance(e, OSError):
        return e.errno == errno.ENOSPC
    return type(e).__name__ == "SafetensorError" and f"(os error {errno.ENOSPC})" in str(e)


@contextmanager
def disk_full_is_user_error(what: str, keeps: str = "") -> Iterator[None]:
    """ENOSPC while writing `what` -> one line that says what was kept and how to go on; other OSErrors pass."""
    try:
        yield
    except Exception as e:
        if not disk_full(e):
            raise
        kept = f"; {keeps}" if keeps else ""
        raise UserError(
            f"disk full while writing {what}: free space there (or set paths.results=DIR on another disk) "
            f"and rerun{kept}"
        ) from None
