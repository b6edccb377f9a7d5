"""A config that left the champion's classes or inputs is refused before validation (exit 3),
through the CLI: it used to validate the pending batches under that config first, so a renamed
`data.text`/feature or a class taken out of `data.classes` quarantined every batch (exit 0,
ledger entries, quarantine events) and the config error was never said."""

from __future__ import annotations

import pytest

from evergreen.cadences import run_flow
from evergreen.cli import main
from evergreen.errors import ExitCode
from tests.digits_pipeline import digits_frame, write_batch, write_config

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_a_config_that_left_the_champion_is_refused_before_validation(tmp_path, capsys):
    landing = tmp_path / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 300)))
    config = write_config(tmp_path, landing, tmp_path / "home")
    assert run_flow("bootstrap", config_path=str(config), batch_ids=["2026-01-01"])["version"]
    write_batch(landing, "2026-01-02", digits_frame(slice(300, 400)))
    capsys.readouterr()

    nine = "data.classes=[0,1,2,3,4,5,6,7,8]"  # a class taken out: its rows would be "unknown"
    code = main(["run", "daily-lora", "--config", str(config), "--set", nine])
    err = capsys.readouterr().err
    assert code == ExitCode.CONFIG, err
    assert "does not match champion v1: data.classes" in err
    reports = tmp_path / "home" / "reports" / "validation" / "daily-lora"
    assert not (reports / "2026-01-02.md").exists()  # not validated, not quarantined

    assert main(["run", "daily-lora", "--config", str(config)]) in (ExitCode.OK,)
    assert '"2026-01-02"' in capsys.readouterr().out  # still pending: taken by the next run
