"""Test hook for the fault tests (tests/test_reliability.py): make this process SIGKILL itself at a chosen
point, so a test can check that a rerun resumes to exactly the result of an uninterrupted run.

    PEFTBENCH_TEST_KILL_AT=step:N        after optimizer step N (before that step's evaluation / checkpoint)
    PEFTBENCH_TEST_KILL_AT=checkpoint:N  while writing the checkpoint of step N: some files written, not renamed

The variable is read here and nowhere else; unset (always, outside tests) it costs one dict lookup.
"""

from __future__ import annotations

import os
import signal


def kill_point(where: str, step: int) -> None:
    if os.environ.get("PEFTBENCH_TEST_KILL_AT") == f"{where}:{step}":
        os.kill(os.getpid(), signal.SIGKILL)
