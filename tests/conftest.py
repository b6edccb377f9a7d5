"""Shared test set-up: quiet, offline, deterministic."""

import os

for _key, _value in {
    "PREFECT_SERVER_ANALYTICS_ENABLED": "false",
    "DO_NOT_TRACK": "1",
    "GX_ANALYTICS_ENABLED": "false",
    "MLFLOW_ENABLE_TELEMETRY": "false",
    "MLFLOW_DISABLE_TELEMETRY": "true",
    "HF_HUB_OFFLINE": "1",
    "TRANSFORMERS_OFFLINE": "1",
    "PREFECT_SERVER_EPHEMERAL_STARTUP_TIMEOUT_SECONDS": "180",
    "TOKENIZERS_PARALLELISM": "false",
    # tiny test models: one intra-op thread is faster than two and immune to a busy machine
    "OMP_NUM_THREADS": "1",
}.items():
    os.environ.setdefault(_key, _value)

# A developer's own settings must not redirect the tests' stores.
for _key in ("MLFLOW_TRACKING_URI", "EVERGREEN_HOME", "EVERGREEN_CONFIG", "PREFECT_API_URL"):
    os.environ.pop(_key, None)
