"""Test hooks for fault injection: stop a process at a named point so a test can SIGKILL it
exactly there (e.g. between an MLflow run and its model version), or break something around it
(e.g. kill the S3 endpoint between batch discovery and the read) and then let it go on.

With `EVERGREEN_TEST_HANG_AT=<point>` in the environment, `hang_here(<point>)` writes the point's
name to the file named by `EVERGREEN_TEST_HANG_SIGNAL` (when set: the test waits for it) and
then sleeps until the process is killed. `EVERGREEN_TEST_PAUSE_AT=<point>` makes
`hang_here(<point>)` write the signal file the same way, then wait until the test deletes it and
return (once per process: a retried task does not pause again). Without the variables (always, outside the fault tests) it returns at once. Used by
`tests/integration/test_faults_registration.py` and `tests/integration/test_faults_s3.py`.
"""

from __future__ import annotations

import os
import time
from pathlib import Path

HANG_AT = "EVERGREEN_TEST_HANG_AT"
HANG_SIGNAL = "EVERGREEN_TEST_HANG_SIGNAL"
PAUSE_AT = "EVERGREEN_TEST_PAUSE_AT"
_paused: set[str] = set()


def hang_here(point: str) -> None:
    """Block forever (HANG_AT) or until released (PAUSE_AT) if a test hook names `point`;
    otherwise do nothing."""
    hang = os.environ.get(HANG_AT) == point
    pause = os.environ.get(PAUSE_AT) == point and point not in _paused
    if not (hang or pause):
        return
    _paused.add(point)
    signal_file = os.environ.get(HANG_SIGNAL)
    if signal_file:
        Path(signal_file).write_text(point)
    while hang or (signal_file and Path(signal_file).exists()):
        time.sleep(0.2)
