"""One process per run id: a lock file next to the record (`<run-id>.lock`).

It is created with O_CREAT | O_EXCL, so of two processes that start the same run exactly one gets it; it holds
pid, host, start time and a token. The holder touches it every few seconds from a daemon thread (a heartbeat
that goes on while the main thread loads data or evaluates). A lock is stale, and taken over, when its pid is
no longer running on this host, or when it has had no heartbeat for `train.lock_stale_s` (a crashed holder on
another host). Take-over is itself guarded by an O_EXCL file, so two processes never both take over one lock.
"""

from __future__ import annotations

import json
import os
import socket
import threading
import time
import uuid
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

from peftbench.errors import disk_full_is_user_error
from peftbench.log import log

HEARTBEAT_S = 10.0
UNWRITTEN_S = 5.0  # a lock its writer creates and fills at once: still empty after this, it never will be
GUARD_STALE_S = 60.0  # a take-over guard older than this was left by a crash in the middle of a take-over


class RunLock:
    def __init__(self, path: Path, info: dict[str, Any], stale_after_s: float):
        self.path, self.info = path, info
        self._stop = threading.Event()
        interval = max(0.5, min(HEARTBEAT_S, stale_after_s / 4))
        self._thread = threading.Thread(target=self._beat, args=(interval,), daemon=True)
        self._thread.start()

    def _beat(self, interval: float) -> None:
        while not self._stop.wait(interval):
            try:
                os.utime(self.path)
            except OSError:
                pass  # removed by a take-over or by hand: the record write that follows still works

    def release(self) -> None:
        """Remove the lock if it is still ours (a take-over may have replaced it)."""
        self._stop.set()
        self._thread.join()
        if (read_lock(self.path) or {}).get("token") == self.info["token"]:
            self.path.unlink(missing_ok=True)


def read_lock(path: Path) -> dict[str, Any] | None:
    try:
        info = json.loads(path.read_text())
    except (OSError, ValueError):
        return None  # gone, or created a moment ago and not yet written
    return info if isinstance(info, dict) else None


def try_lock(path: Path, stale_after_s: float) -> RunLock | None:
    """The lock, or None while another live process holds it."""
    path.parent.mkdir(parents=True, exist_ok=True)
    for _ in range(2):  # the second try follows the take-over of a stale lock
        try:
            fd = os.open(path, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644)
        except FileExistsError:
            if not take_over_if_stale(path, stale_after_s):
                return None
            continue
        info = {
            "pid": os.getpid(),
            "host": socket.gethostname(),
            "started": time.strftime("%Y-%m-%dT%H:%M:%S%z"),
            "token": uuid.uuid4().hex,
        }
        with disk_full_is_user_error(f"the lock {path}", "nothing ran"), unlink_on_error(path):
            with os.fdopen(fd, "w") as f:
                f.write(json.dumps(info))
                f.flush()
                os.fsync(f.fileno())
        return RunLock(path, info, stale_after_s)
    return None


@contextmanager
def unlink_on_error(path: Path) -> Iterator[None]:
    """A lock that could not be written whole is removed (an empty one would hold the run for a while)."""
    try:
        yield
    except BaseException:
        path.unlink(missing_ok=True)
        raise


def stale_reason(path: Path, stale_after_s: float) -> str | None:
    try:
        st = path.stat()
    except FileNotFoundError:
        return "gone"
    age = time.time() - st.st_mtime
    info = read_lock(path)
    if info is None and age > UNWRITTEN_S:  # e.g. created on a full disk: its writer never got to write it
        return f"empty or unreadable lock file ({st.st_size} bytes, {age:.0f} s old)"
    info = info or {}
    if info.get("host") == socket.gethostname() and not pid_alive(int(info.get("pid", 0))):
        return f"pid {info['pid']} is not running"
    if age > stale_after_s:
        return f"no heartbeat for {age:.0f} s > train.lock_stale_s={stale_after_s:g}"
    return None


def take_over_if_stale(path: Path, stale_after_s: float) -> bool:
    """Remove a stale lock; True if it was removed (the caller then tries to create it again)."""
    guard = path.with_name(path.name + ".takeover")
    try:
        os.close(os.open(guard, os.O_CREAT | os.O_EXCL | os.O_WRONLY, 0o644))
    except FileExistsError:
        try:
            if time.time() - guard.stat().st_mtime > GUARD_STALE_S:
                guard.unlink(missing_ok=True)
        except FileNotFoundError:
            pass
        return False  # another process is deciding right now; it will run the job
    try:
        why = stale_reason(path, stale_after_s)
        if why is None:
            return False
        path.unlink(missing_ok=True)
        log.info(f"took over stale lock {path} ({why})")
        return True
    finally:
        guard.unlink(missing_ok=True)


def pid_alive(pid: int) -> bool:
    if pid <= 0:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # exists, owned by someone else
    return True


def describe(path: Path) -> str:
    info = read_lock(path) or {}
    return f"pid {info.get('pid', '?')} on {info.get('host', '?')} since {info.get('started', '?')}"
