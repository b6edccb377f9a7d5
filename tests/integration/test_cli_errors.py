"""The failures a user meets first, end to end through `evergreen run` on ephemeral Prefect: one
line on stderr, the class's exit code, no traceback (Prefect's own console log included)."""

from __future__ import annotations

import pytest

from evergreen.cli import main
from evergreen.errors import ExitCode
from tests.digits_pipeline import digits_frame, write_batch, write_config

pytestmark = pytest.mark.integration


def test_update_before_bootstrap_says_run_bootstrap(tmp_path, monkeypatch, capsys):
    landing = tmp_path / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 120)))
    write_config(tmp_path, landing, tmp_path / "home")
    monkeypatch.chdir(tmp_path)
    assert main(["run", "daily-lora"]) == ExitCode.NO_CHAMPION
    err = capsys.readouterr().err
    assert "Traceback" not in err, err
    (line,) = [x for x in err.splitlines() if x.startswith("evergreen: error: ")]
    assert "evergreen run bootstrap" in line
