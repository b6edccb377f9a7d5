"""The failures a user meets first, end to end through `evergreen run` on ephemeral Prefect: one
line on stderr, the class's exit code, no traceback (Prefect's own console log included)."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path

import pytest

from evergreen.cli import main
from evergreen.config import load_config
from evergreen.errors import ExitCode
from model_registry.registry import Registry
from tests.checkpoints import tiny_checkpoint
from tests.digits_pipeline import FEATURES, digits_frame, write_batch, write_config

ROOT = Path(__file__).resolve().parents[2]

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


def _cli(project: Path, *args: str) -> subprocess.CompletedProcess[str]:
    """`evergreen <args>` as an operator types it: its own process, the project as the
    working directory, ephemeral Prefect (the tests' PREFECT_HOME)."""
    env = {**os.environ, "PYTHONPATH": str(ROOT)}
    command = [sys.executable, "-m", "evergreen.cli", *args]
    return subprocess.run(
        command, cwd=project, env=env, capture_output=True, text=True, timeout=600, check=False
    )


@pytest.fixture(scope="module")
def first_champion(tmp_path_factory) -> Path:
    """A project whose registry holds one version, the champion (nothing to roll back to)."""
    project = tmp_path_factory.mktemp("rollback")
    landing = project / "landing"
    landing.mkdir()
    registry = Registry.from_config(load_config(write_config(project, landing, project / "home")))
    checkpoint = tiny_checkpoint(project / "ckpt", 0, FEATURES, list(range(10)))
    version = registry.log_version(checkpoint, lineage={"gate_decision": "pass"}).version
    registry.promote(version, expected_champion=None, reason="first")
    return project


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["rollback", "--to", "99"], ExitCode.USAGE, "--to 99: model "),
        (["run", "rollback", "--to", "99"], ExitCode.USAGE, "--to 99: model "),
        (["rollback"], ExitCode.FLOW_FAILED, "rollback: no earlier champion"),
    ],
)
def test_a_rollback_that_cannot_happen_is_one_line_under_quiet(first_champion, argv, code, needle):
    """`rollback --to 99` printed the failed task's and flow run's Prefect ERROR lines before
    its one error line, even with -q: an operator sees only the line and the exit code."""
    done = _cli(first_champion, *argv, "-q")
    assert done.returncode == code, done.stderr
    out = done.stdout + done.stderr
    assert "ERROR" not in out and "Traceback" not in out, out
    assert done.stdout.strip() == "", done.stdout
    (line,) = done.stderr.strip().splitlines()
    assert line.startswith("evergreen: error: ") and needle in line, line
