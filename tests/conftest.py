"""Shared test set-up: quiet, offline, deterministic, isolated from a developer's own settings."""

import atexit
import logging
import os
import shutil
import tempfile

from evergreen.cli import QUIET_DEFAULTS

for _key, _value in {
    **QUIET_DEFAULTS,
    # tiny test models: one intra-op thread is faster than two and immune to a busy machine
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_key, _value)


def _temporary_folder(prefix: str) -> str:
    """A folder for this test process, removed when it exits (registered before Prefect's own
    exit handlers, so it runs after them: the ephemeral server is stopped by then)."""
    folder = tempfile.mkdtemp(prefix=prefix)
    atexit.register(shutil.rmtree, folder, ignore_errors=True)
    return folder


# Ephemeral Prefect keeps its database under PREFECT_HOME: tests get their own, not ~/.prefect.
os.environ["PREFECT_HOME"] = _temporary_folder("evergreen-tests-prefect-")
# Base-model file hashes are cached across processes (continual.base_model): not in ~/.cache.
os.environ["EVERGREEN_HASH_CACHE"] = os.path.join(
    _temporary_folder("evergreen-tests-hashes-"), "file-sha256.json"
)

# Parent versions a child version is loaded on are cached across processes (continual.lineage).
os.environ["EVERGREEN_PARENT_CACHE"] = _temporary_folder("evergreen-tests-parents-")

# A developer's own settings must not redirect the tests' stores.
for _key in ("MLFLOW_TRACKING_URI", "EVERGREEN_HOME", "EVERGREEN_CONFIG", "PREFECT_API_URL"):
    os.environ.pop(_key, None)

# Prefect stops its ephemeral test server at interpreter exit and logs it to a stream pytest has
# already closed; that log line is the only casualty, so do not print a traceback for it.
logging.raiseExceptions = False

# Files that take minutes run first: pytest-xdist hands whole files to its workers in collection
# order (`--dist loadfile`, see the Makefile), and a long file handed out last keeps one worker
# busy while the other has nothing left to do.
_LONG_FILES = (
    "test_faults",
    "test_load.py",
    "test_prefect_deployments.py",
    "test_text_pipeline.py",
)


def pytest_collection_modifyitems(items: list) -> None:
    items.sort(key=lambda item: not item.path.name.startswith(_LONG_FILES))  # stable otherwise
