"""The CLI answers instead of raising: one line on stderr, one exit code per class of failure;
and it finds the config the way a person expects (nearest evergreen.yaml, then the demo pointer)."""

from __future__ import annotations

import errno
import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import yaml

from evergreen.cli import main
from evergreen.errors import ExitCode, classify
from evergreen.home import CONFIG_NAME, POINTER, find_config, write_pointer
from flows.common import NoChampionError
from model_registry.registry import NoEarlierChampionError, UnknownVersionError
from model_registry.versions import ArtifactIntegrityError, RegistryError

ROOT = Path(__file__).resolve().parents[2]
MINIMAL = {"data": {"features": ["a", "b"], "label": "y", "classes": [0, 1]}}


def _closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@pytest.fixture
def project(tmp_path, monkeypatch):
    """A project folder with a minimal config, as the working directory."""
    (tmp_path / "evergreen.yaml").write_text(yaml.safe_dump(MINIMAL))
    monkeypatch.chdir(tmp_path)
    return tmp_path


def _one_error_line(capsys) -> str:
    err_lines = [line for line in capsys.readouterr().err.splitlines() if line.strip()]
    errors = [line for line in err_lines if line.startswith("evergreen: error: ")]
    assert len(errors) == 1, err_lines
    assert not any("Traceback" in line for line in err_lines)
    return errors[0]


def test_missing_config(tmp_path, monkeypatch, capsys):
    monkeypatch.chdir(tmp_path)
    monkeypatch.delenv("EVERGREEN_CONFIG", raising=False)
    for folder in tmp_path.resolve().parents:  # e.g. a demo run in /tmp leaves its pointer there
        for found in (folder / CONFIG_NAME, folder / POINTER):
            if found.is_file():
                pytest.skip(f"{found} above the test's folder answers for it (find_config)")
    assert main(["status"]) == ExitCode.CONFIG
    assert "evergreen init" in _one_error_line(capsys)


def test_invalid_config_names_every_bad_key(project, capsys):
    code = main(["status", "--set", "daily.lora_r=-1", "--set", "data.clases=[1]"])
    assert code == ExitCode.CONFIG
    line = _one_error_line(capsys)
    assert "daily.lora_r" in line and "data.clases" in line and "evergreen.yaml" in line


def test_unparseable_config(project, capsys):
    (project / "evergreen.yaml").write_text("data: [unclosed\n")
    assert main(["history"]) == ExitCode.CONFIG
    assert "evergreen.yaml" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "needle"),
    [
        (["run", "daily-lora", "--versions", "1", "2"], "does not take --versions"),
        (["run", "merge", "--versions", "3"], "versions"),  # at least two
        (["run", "merge", "--versions", "3", "3"], "distinct"),  # one version twice: not a merge
        (["run", "daily-lora", "--max-batches", "0"], "max_batches"),
        (["run", "merge", "--versions", "3", "5", "--method", "magic"], "method"),
        (["run", "merge", "--versions", "3", "5", "--method", "ties", "--density", "0"], "density"),
    ],
)
def test_bad_flow_parameters(project, capsys, argv, needle):
    assert main(argv) == ExitCode.USAGE
    assert needle in _one_error_line(capsys)


def test_run_help_lists_every_flow_option(capsys):
    """argparse %-formats help text: a description with a literal "%" (merge's --density says
    "top 20 %") used to crash `evergreen run --help`."""
    with pytest.raises(SystemExit) as exited:
        main(["run", "--help"])
    assert exited.value.code == 0
    out = capsys.readouterr().out
    assert "--density" in out and "20 %" in out and "--seed" in out


def test_a_missing_landing_zone_is_a_config_error(project, capsys):
    assert main(["run", "daily-lora"]) == ExitCode.CONFIG  # ./landing was never created
    line = _one_error_line(capsys)
    assert "does not exist" in line and "data.landing" in line and "--debug" not in line


def test_a_batch_id_not_in_the_landing_zone_is_a_usage_error(project, capsys):
    (project / "landing" / "2026-11-01").mkdir(parents=True)
    (project / "landing" / "2026-11-01" / "part-0.csv").write_text("a,b,y\n1,2,0\n")
    assert main(["run", "daily-lora", "--batch", "2026-11-31"]) == ExitCode.USAGE
    line = _one_error_line(capsys)
    assert "2026-11-31: not in the landing zone" in line and "--debug" not in line


def test_unknown_flow_is_refused_with_the_choices(capsys):
    with pytest.raises(SystemExit) as exited:
        main(["run", "hourly"])
    assert exited.value.code == ExitCode.USAGE
    assert "daily-lora" in capsys.readouterr().err


def test_mlflow_server_down(project, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert main(["status", "--set", f"registry.tracking_uri={uri}"]) == ExitCode.CONNECTION
    assert "cannot reach the MLflow tracking server" in _one_error_line(capsys)


def test_s3_endpoint_down_is_a_connection_error():
    from data_plane.landing import make_s3_client, open_landing

    os.environ.setdefault("AWS_ACCESS_KEY_ID", "test")
    os.environ.setdefault("AWS_SECRET_ACCESS_KEY", "test")
    port = _closed_port()
    client = make_s3_client(endpoint_url=f"http://127.0.0.1:{port}")
    client.meta.config.retries = {"max_attempts": 1}
    with pytest.raises(Exception) as raised:
        open_landing("s3://bucket/prefix", s3_client=client).list_batches()
    failure = classify(raised.value)
    assert failure.code == ExitCode.CONNECTION
    assert "S3 endpoint" in failure.message and "AWS_ENDPOINT_URL" in failure.message
    # the endpoint, not the request's bucket, key and query string
    assert f"endpoint http://127.0.0.1:{port} " in failure.message, failure.message
    assert "list-type" not in failure.message and "bucket" not in failure.message


def _unknown_lora_target() -> Exception:
    """What `--set daily.target_modules=[foo]` raises when the daily attaches its adapter (was
    exit 70, "unexpected ValueError … report it")."""
    from torch import nn

    from continual.lora import LoraSettings, attach_lora

    try:
        attach_lora(nn.Sequential(nn.Linear(2, 2)), LoraSettings(target_modules=["foo"]))
    except ValueError as exc:
        return exc
    raise AssertionError("attach_lora accepted a target the model does not have")


def _missing_model_directory() -> Exception:
    """What a text run meets when model.hf_path names no folder: the tokenizer's load (was exit
    70, "unexpected OSError: We couldn't connect to 'https://huggingface.co'…")."""
    from continual.text import tokenizer_for

    try:
        tokenizer_for("/nonexistent-evergreen-model")
    except OSError as exc:
        return exc
    raise AssertionError("tokenizer_for found a model that does not exist")


def _classified_from_a_flow(error: BaseException):
    """classify() of `error` as the CLI meets it: raised inside a flow, it arrives wrapped and
    classify walks the chain."""
    try:
        try:
            raise error
        except Exception as inner:
            raise RuntimeError("Flow run encountered an exception") from inner
    except RuntimeError as wrapped:
        return classify(wrapped)


@pytest.mark.parametrize(
    ("error", "code", "needle"),
    [
        (NoChampionError("daily-lora needs a champion: run bootstrap"), ExitCode.NO_CHAMPION, ""),
        (RegistryError("model 'x' has no champion to roll back"), ExitCode.NO_CHAMPION, ""),
        (ArtifactIntegrityError("v3: model.safetensors sha256 differs"), ExitCode.REGISTRY, ""),
        # the rollback flow's own refusals (a champion moved after the CLI's check)
        (NoEarlierChampionError("no earlier champion to roll back to from v1"), 1, "rollback: "),
        (UnknownVersionError("--to 99: model 'm' has no version '99'"), 2, "--to 99"),
        (RuntimeError("boom"), ExitCode.INTERNAL, "--debug"),
        (_unknown_lora_target(), ExitCode.CONFIG, "daily.target_modules: LoRA target modules"),
        (_missing_model_directory(), ExitCode.CONFIG, "model.hf_path: hf_path '/nonexistent"),
    ],
)
def test_classes_of_flow_failures(error, code, needle):
    failure = _classified_from_a_flow(error)
    assert failure.code == code
    assert needle in failure.message


def _sqlite_full() -> Exception:
    """What MLflow raises when SQLite cannot grow its database: its own exception, from
    SQLAlchemy's, from sqlite3's (the message is all that names the fault)."""
    import sqlite3

    from mlflow.exceptions import MlflowException
    from sqlalchemy.exc import OperationalError

    try:
        try:
            raise sqlite3.OperationalError("database or disk is full")
        except sqlite3.OperationalError as inner:
            raise OperationalError("INSERT INTO runs", {}, inner) from inner
    except OperationalError as wrapped:
        return MlflowException(f"(sqlalchemy.exc.OperationalError) {wrapped}")


def _safetensors_efbig() -> Exception:
    """What safetensors raises when the disk fills under `save_file` (its Rust I/O error)."""
    from safetensors import SafetensorError

    return SafetensorError("Error while serializing: I/O error: File too large (os error 27)")


@pytest.mark.parametrize(
    ("error", "needle"),
    [
        (OSError(errno.ENOSPC, "No space left on device", "/s/model.safetensors"), "no space"),
        (OSError(errno.EFBIG, "File too large"), "file too large"),
        (PermissionError(errno.EACCES, "Permission denied", "/s/mlartifacts/1"), "/s/mlartifacts"),
        (OSError(errno.EROFS, "Read-only file system", "/s"), "read-only"),
        (_sqlite_full(), "SQLite"),
        (_safetensors_efbig(), "file too large"),
    ],
)
def test_disk_full_and_denied_writes_are_storage_errors(error, needle):
    failure = _classified_from_a_flow(error)
    assert failure.code == ExitCode.STORAGE
    assert failure.message.startswith("storage: ") and needle in failure.message
    assert "\n" not in failure.message


def test_an_unreadable_batch_stays_a_data_error():
    from data_plane.landing import BatchReadError

    try:
        denied = PermissionError(errno.EACCES, "Permission denied")
        raise BatchReadError("b", "part-0.parquet", "cannot be read") from denied
    except BatchReadError as error:
        assert classify(error).code == ExitCode.DATA


def _first_champion(project: Path) -> str:
    """Register a real (tiny) version in the project's registry and make it the champion."""
    from evergreen.config import load_config
    from model_registry.registry import Registry
    from tests.checkpoints import tiny_checkpoint

    registry = Registry.from_config(load_config(project / "evergreen.yaml"))
    checkpoint = tiny_checkpoint(project / "ckpt", 0, ["a", "b"], [0, 1])
    version = registry.log_version(checkpoint, lineage={"gate_decision": "pass"}).version
    registry.promote(version, expected_champion=None, reason="first")
    return version


def _no_flow_run(name, **params):
    raise AssertionError(f"a {name} flow run was started for a rollback that cannot happen")


def test_no_champion_via_the_cli(project, capsys, monkeypatch):
    """`evergreen rollback` before any champion: the registry's answer, not a traceback, and
    no flow run (whose failure Prefect logs at ERROR, even with -q)."""
    monkeypatch.setattr("evergreen.cli.run_flow", _no_flow_run)
    assert main(["rollback"]) == ExitCode.NO_CHAMPION
    assert "no champion" in _one_error_line(capsys)


@pytest.mark.parametrize(
    ("argv", "code", "needle"),
    [
        (["rollback"], 1, "rollback: no earlier champion"),
        (["run", "rollback"], 1, "rollback: no earlier champion"),
        (["rollback", "--to", "99"], 2, "--to 99: model 'evergreen' has no version '99'"),
        (["run", "rollback", "--to", "99"], 2, "--to 99: model 'evergreen' has no version"),
    ],
)
def test_a_rollback_that_cannot_roll_back_exits_as_the_readme_says(
    project, capsys, monkeypatch, argv, code, needle
):
    """From the first champion: the command ran and did not roll back (1); `--to` a version
    that does not exist: a bad flag (2) — not "the registry refused" (5). Both refused before
    a flow run starts."""
    _first_champion(project)
    monkeypatch.setattr("evergreen.cli.run_flow", _no_flow_run)
    assert main(argv) == code
    assert needle in _one_error_line(capsys)


def test_a_rollback_to_the_champion_says_why_it_did_not_roll_back(project, capsys, monkeypatch):
    """`evergreen rollback --to 1` when v1 is the champion exits 1: with the one error line
    every failure prints (it printed none, only the JSON outcome on stdout)."""

    version = _first_champion(project)

    def rollback_flow(name, **params):  # what the flow answers (a champion is no refusal)
        reasons = [f"v{version} already champion"]
        return {"cadence": "rollback", "decision": "skipped", "reasons": reasons}

    monkeypatch.setattr("evergreen.cli.run_flow", rollback_flow)
    assert main(["rollback", "--to", version]) == ExitCode.FLOW_FAILED
    assert f"rollback: did not roll back: v{version} already champion" in _one_error_line(capsys)


def test_debug_shows_the_traceback(project, capsys, monkeypatch):
    monkeypatch.setenv("MLFLOW_HTTP_REQUEST_MAX_RETRIES", "0")
    uri = f"http://127.0.0.1:{_closed_port()}"
    assert main(["status", "--debug", "--set", f"registry.tracking_uri={uri}"]) == 6
    assert "Traceback (most recent call last)" in capsys.readouterr().err


def test_config_discovery_order(tmp_path, monkeypatch):
    nested = tmp_path / "project" / "sub" / "deeper"
    nested.mkdir(parents=True)
    demo = tmp_path / ".evergreen" / "demo" / "evergreen.yaml"
    demo.parent.mkdir(parents=True)
    demo.write_text(yaml.safe_dump(MINIMAL))
    write_pointer(demo, cwd=tmp_path)
    # 4. the demo's pointer, from anywhere below the checkout
    assert find_config(cwd=nested).path == demo.resolve()
    # 3. the nearest evergreen.yaml wins over the pointer
    project = tmp_path / "project" / "evergreen.yaml"
    project.write_text(yaml.safe_dump(MINIMAL))
    found = find_config(cwd=nested)
    assert (found.path, found.source) == (project.resolve(), "nearest evergreen.yaml")
    # 2. $EVERGREEN_CONFIG, 1. --config
    monkeypatch.setenv("EVERGREEN_CONFIG", str(demo))
    assert find_config(cwd=nested).source == "$EVERGREEN_CONFIG"
    assert find_config(project, cwd=nested).source == "--config"


def test_relative_home_is_relative_to_the_config_file(project, monkeypatch, capsys):
    (project / "sub").mkdir()
    monkeypatch.chdir(project / "sub")
    assert main(["history", "--json"]) == 0
    captured = capsys.readouterr()
    assert json.loads(captured.out) == []
    assert f"config: {project / 'evergreen.yaml'} (nearest evergreen.yaml)" in captured.err
    assert (project / ".evergreen" / "mlflow.db").exists()
    assert not (project / "sub" / ".evergreen").exists()
    assert main(["history", "--quiet"]) == 0
    assert "config:" not in capsys.readouterr().err


def test_ui_prints_both_uis_on_this_home(project, capsys):
    assert main(["ui", "-q"]) == 0
    out = capsys.readouterr().out
    assert f"sqlite:///{project / '.evergreen' / 'mlflow.db'}" in out
    assert "prefect server start" in out and "http://127.0.0.1:4200" in out


def test_ui_on_another_port_tells_the_prefect_ui_where_its_api_is(project):
    """`prefect server start --port N` alone serves a page that calls the API on :4200."""
    from evergreen.config import load_config
    from evergreen.ui import ui_commands

    cfg = load_config(project / "evergreen.yaml")
    _, prefect = ui_commands(cfg, mlflow_port=5001, prefect_port=4301)
    assert dict(prefect.env)["PREFECT_UI_API_URL"] == "http://127.0.0.1:4301/api"
    assert "PREFECT_UI_API_URL=http://127.0.0.1:4301/api" in prefect.shell
    assert prefect.argv[-2:] == ("--port", "4301")


def test_version_and_exit_code_table_in_help():
    done = subprocess.run(
        [sys.executable, "-m", "evergreen.cli", "--version"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        check=False,
    )
    assert done.returncode == 0 and done.stdout.startswith("evergreen ")
    readme = (ROOT / "README.md").read_text()
    for code in ExitCode:
        assert f"| {code.value} |" in readme, f"exit code {code.value} missing from README"


def test_history_and_status_show_a_champion_moved_by_hand(project, capsys):
    """Reconciliation runs before the history is shown, not only when a flow starts."""
    from evergreen.config import load_config
    from model_registry.registry import Registry
    from tests.checkpoints import tiny_checkpoint

    registry = Registry.from_config(load_config(project / "evergreen.yaml"))
    checkpoint = tiny_checkpoint(project / "ckpt", 0, ["a", "b"], [0, 1])
    gated = registry.log_version(checkpoint, lineage={"gate_decision": "pass"}).version
    registry.promote(gated, expected_champion=None, reason="first")
    rejected = registry.log_version(checkpoint, lineage={"gate_decision": "fail"}).version
    # what the MLflow UI does: the same REST call, not evergreen's promote
    registry.client.set_registered_model_alias(registry.model_name, "champion", rejected)
    capsys.readouterr()
    assert main(["history", "--json", "-q"]) == 0
    captured = capsys.readouterr()
    newest = json.loads(captured.out)[0]
    assert (newest["action"], newest["version"], newest["previous"]) == ("manual", rejected, gated)
    assert newest["reason"].startswith("UNGATED")
    assert "UNGATED" in captured.err
    assert main(["status", "--json", "-q"]) == 0  # recorded once, not again
    assert "recorded:" not in capsys.readouterr().err
    assert [e.action for e in registry.history()].count("manual") == 1


def test_piped_output_is_wide_enough_for_the_status_tables(monkeypatch):
    """`evergreen status | less` used rich's 80 columns, cutting the tables' headers."""
    import io

    from evergreen import cli

    monkeypatch.delenv("COLUMNS", raising=False)
    monkeypatch.setattr(sys, "stdout", io.StringIO())
    assert cli._console().width == cli.PIPED_WIDTH
    monkeypatch.setenv("COLUMNS", "90")  # the user's own width wins
    assert cli._console().width == 90


def test_demo_refuses_to_wipe_a_folder_it_did_not_make(tmp_path, capsys):
    project_home = tmp_path / "home"
    project_home.mkdir()
    (project_home / "mlflow.db").write_text("a project's registry")
    assert main(["demo", "--home", str(project_home)]) == ExitCode.USAGE
    assert "was not made by `evergreen demo`" in _one_error_line(capsys)
    assert (project_home / "mlflow.db").read_text() == "a project's registry"  # untouched


def test_demo_wipes_only_what_it_made(tmp_path):
    from evergreen.cli import DEMO_MARKER, _wipe_demo_home

    made = tmp_path / "made"
    made.mkdir()
    (made / DEMO_MARKER).write_text("")
    (made / "mlflow.db").write_text("")
    _wipe_demo_home(made, ours=False)
    assert not made.exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    _wipe_demo_home(empty, ours=False)
    assert not empty.exists()
    default = tmp_path / "default"
    (default / "reports").mkdir(parents=True)  # a demo home of a release before the marker
    _wipe_demo_home(default, ours=True)
    assert not default.exists()


def test_deploy_without_a_prefect_server_is_one_usage_line(project, capsys, monkeypatch):
    monkeypatch.setenv("PREFECT_API_URL", "")
    assert main(["deploy"]) == ExitCode.USAGE
    assert "deploy needs a Prefect server" in _one_error_line(capsys)
