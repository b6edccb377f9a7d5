"""The logger of the Prefect run a task is in, or a plain logger outside one (tests, scripts,
benchmarks call the task functions directly)."""

from __future__ import annotations

import logging
from typing import Any

from prefect import get_run_logger
from prefect.exceptions import MissingContextError


def run_logger(fallback: str = "evergreen.tasks") -> logging.Logger | logging.LoggerAdapter[Any]:
    """`get_run_logger()` inside a flow or task run, else the `fallback` logger."""
    try:
        return get_run_logger()
    except MissingContextError:
        return logging.getLogger(fallback)
