"""The batch ledger has one writer: tasks/ledger.py (every other module goes through it)."""

from __future__ import annotations

import re
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
PACKAGES = ("continual", "data_plane", "demo", "evergreen", "flows", "model_registry", "tasks")
IMPORTS_LEDGER = re.compile(r"^\s*from model_registry\.ledger import .*\bLedger\b", re.M)


def _sources() -> dict[str, str]:
    return {
        path.relative_to(ROOT).as_posix(): path.read_text(encoding="utf-8")
        for package in PACKAGES
        for path in sorted((ROOT / package).rglob("*.py"))
    }


def test_only_tasks_ledger_writes_ledger_entries():
    writers = [
        name
        for name, text in _sources().items()
        if IMPORTS_LEDGER.search(text) and re.search(r"\.record\(", text)
    ]
    assert writers == ["tasks/ledger.py"], writers


def test_the_check_would_see_a_second_writer():
    sneaky = "from model_registry.ledger import Ledger\nLedger.from_config(cfg).record(c, b, 'x')"
    assert IMPORTS_LEDGER.search(sneaky) and re.search(r"\.record\(", sneaky)
