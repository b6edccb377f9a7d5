"""A test hook for fault injection: stop a process at a named point so a test can SIGKILL it
exactly there (e.g. between an MLflow run and its model version).

With `EVERGREEN_TEST_HANG_AT=<point>` in the environment, `hang_here(<point>)` writes the point's
name to the file named by `EVERGREEN_TEST_HANG_SIGNAL` (when set: the test waits for it) and
then sleeps until the process is killed. Without the variable (always, outside the fault tests)
it returns at once. Used by `tests/integration/test_faults_registration.py`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

HANG_AT = "EVERGREEN_TEST_HANG_AT"
HANG_SIGNAL = "EVERGREEN_TEST_HANG_SIGNAL"


def hang_here(point: str) -> None:
    """Block forever if the test hook names `point`; otherwise do nothing."""
    if os.environ.get(HANG_AT) != point:
        return
    signal_file = os.environ.get(HANG_SIGNAL)
    if signal_file:
        Path(signal_file).write_text(point)
    while True:
        time.sleep(1)
