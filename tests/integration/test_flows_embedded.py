"""Every cadence flow end to end on the embedded default (ephemeral Prefect, SQLite MLflow).

One module-scoped pipeline is walked through in order: bootstrap → daily-lora → rerun (no-op)
→ corrupt batch (quarantine) → weekly-replay → monthly-finetune → stream-monitor (drift) →
consolidate → merge → rollback, checking the registry, ledger and files after each step.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import httpx
import pytest

from benchmarks.screenshots import DATASET_ROLES, mlflow_server, version_page
from evergreen.cadences import run_flow
from evergreen.config import load_config
from model_registry.ledger import Ledger
from model_registry.registry import Registry
from tests.digits_pipeline import digits_frame, write_batch, write_config
from tests.integration.servers import background, free_port, wait_http

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    landing = root / "landing"
    write_batch(landing, "2026-01-01", digits_frame(slice(0, 700)))
    write_batch(landing, "2026-01-02", digits_frame(slice(700, 900)))
    broken = digits_frame(slice(900, 960)).drop(columns=["pixel_5"])
    write_batch(landing, "2026-01-03", broken, fmt="csv")
    write_batch(landing, "2026-01-05", digits_frame(slice(960, 1260), shift=1))
    write_batch(landing, "2026-01-08", digits_frame(slice(1260, 1560), shift=1))
    write_batch(landing, "2026-01-09", digits_frame(slice(1560, 1797), shift=2))
    config = write_config(root, landing, root / "home")
    cfg = load_config(config)
    return {
        "config": str(config),
        "cfg": cfg,
        "landing": landing,
        "registry": Registry.from_config(cfg),
        "ledger": Ledger.from_config(cfg),
    }


def _run(pipeline, name, **params):
    return run_flow(name, config_path=pipeline["config"], **params)


def _champion(pipeline) -> str | None:
    champion = pipeline["registry"].champion()
    return champion.version if champion else None


def test_01_bootstrap_registers_first_champion(pipeline):
    result = _run(pipeline, "bootstrap", batch_ids=["2026-01-01"])
    assert result["decision"] == "promoted", result
    assert _champion(pipeline) == result["version"]
    tags = pipeline["registry"].get_version(result["version"]).tags
    for key in (
        "parent_version",
        "cadence",
        "method",
        "batch_ids",
        "data_hash",
        "git_commit",
        "flow_run_id",
        "gate_decision",
    ):
        assert f"evergreen.{key}" in tags, key
    assert tags["evergreen.batch_ids"] == "2026-01-01"
    # the bootstrap batch is not new to the update cadences
    assert pipeline["ledger"].is_processed("daily-lora", "2026-01-01")


def test_02_daily_lora_gates_and_records(pipeline):
    before = _champion(pipeline)
    result = _run(pipeline, "daily-lora", batch_ids=["2026-01-02"])
    assert result["decision"] in ("promoted", "rejected")
    assert result["reasons"], "a decision always carries its reasons"
    expected = result["version"] if result["decision"] == "promoted" else before
    assert _champion(pipeline) == expected
    assert pipeline["ledger"].is_processed("daily-lora", "2026-01-02")
    if result.get("version"):  # the run explains itself in the MLflow UI
        params = _assert_run_explains_itself(pipeline, result["version"])
        assert params["daily.lora_r"] == "32" and json.loads(params["lora.target_modules"])
        run = pipeline["registry"].client.get_run(
            pipeline["registry"].get_version(result["version"]).run_id
        )
        assert run.data.metrics["select.promote"] == 1.0  # the screen that kept the adapter
        assert run.data.metrics["select.new.n"] > 0


def _assert_run_explains_itself(pipeline, version: str) -> dict[str, str]:
    """Params, loss curve, timing, datasets by role and model-linked metrics on the run."""
    registry = pipeline["registry"]
    info = registry.get_version(version)
    run = registry.client.get_run(info.run_id)
    params = run.data.params
    assert "gate.confidence" in params and int(params["train.steps"]) >= 40
    curve = registry.client.get_metric_history(run.info.run_id, "train.loss")
    assert len(curve) == int(params["train.steps"])
    assert run.data.metrics["time.train_s"] > 0
    contexts = {
        next(t.value for t in d.tags if t.key == "mlflow.data.context"): d.dataset
        for d in run.inputs.dataset_inputs
    }
    assert {"train", "selection", "gate", "retention"} <= set(contexts)
    batch = info.tags["evergreen.batch_ids"]
    assert json.loads(contexts["train"].source)["uri"].endswith(f"/landing/{batch}")
    docs = run.data.tags[f"evergreen.data_docs.{batch}"]  # the batch's GX Data Docs page
    assert Path(url2pathname(urlparse(docs).path)).is_file()
    model = registry.client.get_logged_model(run.outputs.model_outputs[0].model_id)
    linked = {m.key for m in model.metrics}
    assert {"gate.new.lcb", "eval.champion.recall.3", "eval.challenger.recall.3"} <= linked
    return params


def test_03_rerun_of_processed_batch_is_a_noop(pipeline):
    versions_before = len(pipeline["registry"].versions(limit=100))
    result = _run(pipeline, "daily-lora", batch_ids=["2026-01-02"])
    assert result["decision"] == "skipped"
    assert len(pipeline["registry"].versions(limit=100)) == versions_before


def test_03b_forced_rerun_is_recorded_as_forced(pipeline):
    result = _run(pipeline, "daily-lora", batch_ids=["2026-01-02"], force=True)
    assert result["decision"] in ("promoted", "rejected"), result
    entry = pipeline["ledger"].processed("daily-lora")["2026-01-02"]
    assert entry.details.get("forced") == "true"


def test_03c_diverging_training_fails_cleanly_and_keeps_the_batch_pending(pipeline):
    champion, versions = _champion(pipeline), len(pipeline["registry"].versions(limit=100))
    absurd = ["weekly.train.lr=1e12", "weekly.train.weight_decay=1.0"]  # weights blow up
    with pytest.raises(Exception, match="training diverged"):
        _run(pipeline, "weekly-replay", batch_ids=["2026-01-05"], overrides=absurd)
    assert _champion(pipeline) == champion
    assert len(pipeline["registry"].versions(limit=100)) == versions  # nothing registered
    entry = pipeline["ledger"].processed("weekly-replay")["2026-01-05"]
    assert entry.outcome == "failed" and "training diverged" in entry.details["error"]
    assert not pipeline["ledger"].is_processed("weekly-replay", "2026-01-05")  # still pending
    assert "challenger" not in pipeline["registry"].aliases()


def _digest(folder: Path) -> dict[str, str]:
    return {p.name: hashlib.sha256(p.read_bytes()).hexdigest() for p in sorted(folder.iterdir())}


def test_04_corrupt_batch_is_quarantined_and_nothing_changes(pipeline):
    folder = pipeline["landing"] / "2026-01-03"
    files_before, champion_before = _digest(folder), _champion(pipeline)
    result = _run(pipeline, "daily-lora", batch_ids=["2026-01-03"])
    assert result["decision"] == "quarantined"
    assert "2026-01-03" in result["quarantined"]
    assert _digest(folder) == files_before
    assert _champion(pipeline) == champion_before
    entry = pipeline["ledger"].processed("daily-lora")["2026-01-03"]
    assert entry.outcome == "quarantined"
    assert "pixel_5" in entry.details["reason"]
    report = pipeline["cfg"].home_path / "reports" / "validation" / "daily-lora" / "2026-01-03.md"
    assert "pixel_5" in report.read_text()


def test_04b_a_quarantined_batch_is_announced_once_across_cadences(pipeline):
    reports = pipeline["cfg"].home_path / "reports" / "validation" / "weekly-replay"
    result = _run(pipeline, "weekly-replay", batch_ids=["2026-01-03"])
    assert result["decision"] == "quarantined"
    assert "pixel_5" in result["quarantined"]["2026-01-03"]
    assert not (reports / "2026-01-03.md").exists()  # not validated (nor announced) again
    ledger = pipeline["ledger"]
    weekly = ledger.processed("weekly-replay")["2026-01-03"]
    daily = ledger.processed("daily-lora")["2026-01-03"]
    assert weekly.outcome == "quarantined"
    assert weekly.details["fingerprint"] == daily.details["fingerprint"]
    # the files as read: fixing them in place makes the batch pending again (test_pending)
    assert weekly.details["listing"] == daily.details["listing"]
    forced = _run(pipeline, "weekly-replay", batch_ids=["2026-01-03"], force=True)
    assert forced["decision"] == "quarantined"
    assert "pixel_5" in (reports / "2026-01-03.md").read_text()  # a forced run re-validates


@pytest.mark.parametrize(
    ("flow", "batch"), [("weekly-replay", "2026-01-05"), ("monthly-finetune", "2026-01-08")]
)
def test_05_update_cadences_train_and_gate(pipeline, flow, batch):
    before = _champion(pipeline)
    # weekly-replay is the cadence drift starts: it is told why, and records it
    why = {"trigger": "re-run after the export fix"} if flow == "weekly-replay" else {}
    # weekly also chooses its step count on the select rows (early stopping): half or all
    steps = ["weekly.step_grid=[0.5,1]"] if flow == "weekly-replay" else []
    result = _run(pipeline, flow, batch_ids=[batch], overrides=steps, **why)
    assert result["decision"] in ("promoted", "rejected"), result
    assert result["metrics"]["gate.retention.n"] > 0
    kept = result["metrics"]["train.kept_step"]
    scored = [k for k in result["metrics"] if k.startswith("calibration.lambda_10.step_")]
    assert len(scored) == (2 if steps else 0)
    assert kept in {float(k.rsplit("_", 1)[1]) for k in scored} if steps else kept > 0
    tags = pipeline["registry"].get_version(result["version"]).tags
    assert tags["evergreen.parent_version"] == before
    assert tags["evergreen.cadence"] == flow
    assert tags["evergreen.trigger"] == why.get("trigger", "schedule or manual")
    params = _assert_run_explains_itself(pipeline, result["version"])
    assert params["ewc.lambda"] == "10.0"
    section = flow.split("-")[0]
    assert params[f"{section}.ewc_lambda"] == "10.0"


def test_06_stream_monitor_detects_drift_on_shifted_digits(pipeline):
    result = _run(pipeline, "stream-monitor", batch_ids=["2026-01-09"])
    assert result["metrics"]["stream.samples"] > 100
    assert result["decision"] in ("drift", "skipped")


def _other_version(pipeline) -> str:
    current = _champion(pipeline)
    return next(v.version for v in pipeline["registry"].versions(limit=50) if v.version != current)


def test_07_consolidate_and_merge_are_gated(pipeline):
    consolidated = _run(pipeline, "consolidate")
    assert consolidated["decision"] in ("promoted", "rejected", "skipped")
    merged = _run(pipeline, "merge", versions=[_champion(pipeline), _other_version(pipeline)])
    assert merged["decision"] in ("promoted", "rejected")
    assert any(k.startswith("merge.distance") for k in merged["metrics"])


def test_07b_a_rejected_challenger_is_registered_but_never_champion(pipeline):
    """A rejection on demand, whatever the defaults learn: at 99.9999 % confidence no
    challenger can show non-inferiority on a few dozen gate rows (test_10 reads its row)."""
    before = _champion(pipeline)
    strict = ["gate.confidence=0.999999"]
    result = _run(pipeline, "weekly-replay", batch_ids=["2026-01-05"], force=True, overrides=strict)
    assert result["decision"] == "rejected", result
    assert result["version"] and result["version"] != before
    assert _champion(pipeline) == before
    tags = pipeline["registry"].get_version(result["version"]).tags
    assert tags["evergreen.decision"] == "rejected"


def test_08_rollback_restores_previous_champion(pipeline):
    registry, current = pipeline["registry"], _champion(pipeline)
    other = _other_version(pipeline)
    assert registry.promote(other, expected_champion=current, reason="test", actor="test").promoted
    result = _run(pipeline, "rollback", reason="test rollback")
    assert result["decision"] == "rolled-back", result
    assert result["champion"] == current
    assert registry.history()[0].action == "rollback"


def test_09_champion_serves_in_a_fresh_process(pipeline):
    cfg = pipeline["cfg"]
    code = (
        "import mlflow, pandas as pd; from tests.digits_pipeline import digits_frame;"
        f"mlflow.set_tracking_uri({cfg.tracking_uri!r});"
        f"m = mlflow.pyfunc.load_model('models:/{cfg.registry.name}@champion');"
        "df = digits_frame(slice(1700, 1797)); out = m.predict(df.drop(columns=['label']));"
        "acc = (pd.Series(out['prediction']).to_numpy() == df['label'].to_numpy()).mean();"
        "print(acc); assert acc > 0.5, acc"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]


def test_10_cli_status_json_and_report(pipeline, capsys):
    from evergreen.cli import main

    assert main(["status", "--json", "--config", pipeline["config"]]) == 0
    status = json.loads(capsys.readouterr().out)
    assert str(status["champion"]["version"]) == _champion(pipeline)
    assert main(["report", "--config", pipeline["config"]]) == 0
    report = pipeline["cfg"].home_path / "reports" / "latest" / "report.md"
    text = report.read_text()
    assert "daily-lora" in text
    bootstrap_row = next(line for line in text.splitlines() if "| bootstrap |" in line)
    assert "0." in bootstrap_row.split("|")[6], bootstrap_row  # the gate's new-data accuracy
    # the champion column is the champion after each run, never a rejected challenger
    assert f"- champion now: version {status['champion']['version']}" in text
    promoted = {e["details"].get("version") for e in status["ledger"] if e["outcome"] == "promoted"}
    rows = [line.split("|") for line in text.splitlines() if line.startswith("| 20")]
    rejected = [cells for cells in rows if cells[4].strip() == "rejected"]
    assert rejected, "the pipeline has rejected updates"
    assert all(cells[5].strip() in promoted for cells in rejected), rejected


def test_11_the_mlflow_ui_shows_lineage_datasets_and_metrics_of_a_version(pipeline, tmp_path):
    """A real `mlflow server` on the pipeline's store, read through the REST paths the UI's
    pages call (`/ajax-api`): the champion's version page and a daily update's, as
    `make screenshots` pictures them (docs/img/mlflow-*.png)."""
    cfg, name = pipeline["cfg"], pipeline["cfg"].registry.name
    log = tmp_path / "mlflow.log"
    url, command, env = mlflow_server(cfg, free_port(), log)
    with background(command, env=env, log=log) as process:
        wait_http(f"{url}/health", 240, process, log)
        assert "<title>MLflow</title>" in httpx.get(url, timeout=30).text  # the UI itself
        champion = version_page(url, name, "champion")
        assert champion.problems() == [], champion
        assert champion.version == _champion(pipeline) and "champion" in champion.aliases
        daily = next(
            v.version
            for v in pipeline["registry"].versions(limit=100)
            if v.tags.get("evergreen.cadence") == "daily-lora"
        )
        page = version_page(url, name, daily)
    assert page.problems() == [], page
    batch = page.tags["evergreen.batch_ids"]
    assert set(DATASET_ROLES) <= set(page.datasets)
    assert page.datasets["train"] == f"train[{batch}]"
    assert page.tags["evergreen.gate_decision"] and page.params["daily.lora_r"] == "32"
    assert {"gate.new.lcb", "eval.champion.recall.3", "eval.challenger.recall.3"} <= set(
        page.model_metrics
    )
    assert page.run_metrics["time.train_s"] > 0
