"""Registry on the embedded default (SQLite + local artifacts): logging, CAS promotion, races,
rollback, integrity, and the pyfunc served from a fresh interpreter.

One tracking store per module; every test registers its own model name, so tests stay
independent while paying MLflow's database set-up once.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
import time
from pathlib import Path
from urllib.parse import urlparse
from urllib.request import url2pathname

import mlflow
import numpy as np
import pandas as pd
import pytest
import torch
from rich.console import Console

from continual.checkpoint import load_checkpoint
from continual.inference import predict_proba
from evergreen.config import config_from_dict
from model_registry.ledger import Ledger
from model_registry.locking import promotion_lock
from model_registry.promotion_history import PromotionEvent, rollback_target
from model_registry.pyfunc_model import EvergreenPyfunc, file_sha256
from model_registry.registry import Registry, StaleChampionError
from model_registry.run_log import ensure_experiment
from model_registry.status import ledger_why, render_status, status_snapshot
from model_registry.versions import CHECKPOINT_SUBPATH, ArtifactIntegrityError, RegistryError
from tests.checkpoints import tiny_checkpoint

FEATURES = ["f0", "f1", "f2", "f3"]
CLASSES = ["cat", "dog", "eel"]


def make_checkpoint(directory: Path, seed: int) -> Path:
    return tiny_checkpoint(directory, seed, FEATURES, CLASSES)


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> dict:
    root = tmp_path_factory.mktemp("registry")
    return {
        "root": root,
        "uri": f"sqlite:///{root}/mlflow.db",
        "artifacts": (root / "mlartifacts").as_uri(),
        "locks": root / "locks",
        "checkpoints": [make_checkpoint(root / f"ckpt{i}", seed=i) for i in range(3)],
    }


def new_registry(store: dict, name: str) -> Registry:
    return Registry(
        store["uri"], name, artifact_location=store["artifacts"], lock_dir=store["locks"]
    )


@pytest.fixture
def registry(store: dict, request: pytest.FixtureRequest) -> Registry:
    return new_registry(store, f"m-{request.node.name}".replace("[", "-").rstrip("]"))


def log(registry: Registry, store: dict, i: int, parent: str | None = None) -> str:
    lineage = {"parent_version": parent or "none", "cadence": "daily", "method": "lora"}
    return registry.log_version(store["checkpoints"][i % 3], lineage=lineage).version


def stored_file(registry: Registry, version: str, name: str) -> Path:
    """The file inside the local artifact store (what an attacker or bit rot would change)."""
    uri = registry.client.get_model_version_download_uri(registry.model_name, version)
    return Path(url2pathname(urlparse(uri).path)) / CHECKPOINT_SUBPATH / name


def test_log_version_records_lineage_hashes_and_run_data(registry, store, tmp_path):
    report = tmp_path / "gate.json"
    report.write_text('{"promote": true}')
    info = registry.log_version(
        store["checkpoints"][0],
        lineage={"parent_version": "none", "evergreen.cadence": "monthly", "data_hash": "abc"},
        metrics={"accuracy": 0.75},
        params={"method": "ewc"},
        run_name="monthly-2026-11",
        reports={"gate-report.json": report},
    )
    assert info.version == "1" and info.aliases == [] and info.source.startswith("models:/")
    assert info.tags["evergreen.cadence"] == "monthly"  # a given prefix is not doubled
    assert info.tags["evergreen.parent_version"] == "none"
    for name in ("spec.json", "model.safetensors"):
        assert info.tags[f"evergreen.sha256.{name}"] == file_sha256(store["checkpoints"][0] / name)
    run = registry.client.get_run(info.run_id)
    assert run.data.metrics["accuracy"] == 0.75 and run.data.params["method"] == "ewc"
    assert run.data.tags["evergreen.data_hash"] == "abc" and run.info.run_name == "monthly-2026-11"
    reports = [a.path for a in registry.client.list_artifacts(info.run_id, "reports")]
    assert reports == ["reports/gate-report.json"]


def test_log_version_into_an_existing_run_keeps_it_and_global_state(registry, store):
    run = registry.client.create_run(
        ensure_experiment(registry.client, "evergreen", store["artifacts"])
    )
    before = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), list(sys.path))
    modules = set(sys.modules)
    info = registry.log_version(store["checkpoints"][1], lineage={}, run_id=run.info.run_id)
    assert info.run_id == run.info.run_id
    assert registry.client.get_run(run.info.run_id).info.status == "RUNNING"
    # the process-global fluent state MLflow's log_model needs is put back as it was
    after = (mlflow.get_tracking_uri(), os.environ.get("MLFLOW_TRACKING_URI"), list(sys.path))
    assert after == before
    # MLflow executes the model file as a new `code_model_<uuid>` module at every log: none kept
    assert not [m for m in set(sys.modules) - modules if m.startswith("code_model_")]


def test_log_version_refuses_a_checkpoint_that_cannot_serve(registry, store, tmp_path):
    broken = tmp_path / "broken"
    make_checkpoint(broken, seed=7)
    (broken / "model.safetensors").write_bytes(b"\x00" * 10)
    with pytest.raises(RegistryError, match=r"model\.safetensors"):
        registry.log_version(broken, lineage={})
    with pytest.raises(RegistryError, match="relative path inside reports/"):
        registry.log_version(store["checkpoints"][0], lineage={}, reports={"../x": broken})
    with pytest.raises(RegistryError, match="does not exist"):
        registry.log_version(store["checkpoints"][0], lineage={}, reports={"r": tmp_path / "no"})
    assert registry.versions() == []


def test_download_round_trips_and_refuses_a_full_folder(registry, store, tmp_path):
    version = log(registry, store, 0)
    target = registry.download(version, tmp_path / "dl")
    model, spec = load_checkpoint(target)
    original, _ = load_checkpoint(store["checkpoints"][0])
    X = torch.randn(5, len(FEATURES))
    assert torch.equal(predict_proba(model, X), predict_proba(original, X))
    assert spec.classes == CLASSES
    with pytest.raises(RegistryError, match="not empty"):
        registry.download(version, tmp_path / "dl")
    with pytest.raises(RegistryError, match="no version '99'"):
        registry.download("99", tmp_path / "other")


def test_promote_is_compare_and_set(registry, store):
    v1, v2 = log(registry, store, 0), log(registry, store, 1, parent="1")
    assert registry.champion() is None
    first = registry.promote(v1, expected_champion=None, reason="bootstrap", actor="test")
    assert (first.promoted, first.previous, first.stale) == (True, None, False)
    registry.set_challenger(v2)
    stale = registry.promote(v2, expected_champion=None, reason="gate passed")
    assert (stale.promoted, stale.stale) == (False, True)
    assert stale.reason == (
        "stale comparison: champion is now v1, the challenger was evaluated against no champion"
    )
    with pytest.raises(StaleChampionError, match="now v1"):
        stale.raise_if_stale()
    assert registry.champion().version == v1 and registry.challenger().version == v2
    second = registry.promote(v2, expected_champion=v1, reason="gate passed", flow_run_id="f-1")
    assert second.promoted and second.previous == v1
    assert registry.champion().version == v2
    assert registry.challenger() is None  # the challenger alias left with the promotion
    again = registry.promote(v2, expected_champion=v2, reason="again")
    assert not again.promoted and not again.stale
    events = registry.history()
    assert [(e.action, e.version, e.previous) for e in events] == [
        ("promote", v2, v1),
        ("promote", v1, None),
    ]
    assert events[0].flow_run_id == "f-1" and events[1].actor == "test"


def _race(registry: Registry, version: str, expected: str, barrier, out: list) -> None:
    barrier.wait()
    out.append(registry.promote(version, expected_champion=expected, reason="race"))


def test_racing_threads_exactly_one_wins(registry, store):
    v1 = log(registry, store, 0)
    registry.promote(v1, expected_champion=None, reason="bootstrap")
    challengers = [log(registry, store, 1, parent=v1), log(registry, store, 2, parent=v1)]
    barrier, results = threading.Barrier(2), []
    threads = [
        threading.Thread(target=_race, args=(registry, v, v1, barrier, results))
        for v in challengers
    ]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join(timeout=120)
    assert sorted(r.promoted for r in results) == [False, True]
    winner = next(r for r in results if r.promoted)
    loser = next(r for r in results if not r.promoted)
    assert loser.stale and f"champion is now v{winner.version}" in loser.reason
    assert registry.champion().version == winner.version
    latest = registry.history()[0]
    assert (latest.version, latest.previous) == (winner.version, v1)  # gated against it
    assert len(registry.history()) == 2


RACER = """
import json, sys, time
from pathlib import Path
from model_registry.registry import Registry
uri, artifacts, locks, name, version, expected, sync = sys.argv[1:]
registry = Registry(uri, name, artifact_location=artifacts, lock_dir=Path(locks))
registry.verify_artifacts(version)  # warm up (imports, connections) before the start signal
Path(sync, f"ready-{version}").touch()
while not Path(sync, "go").exists():
    time.sleep(0.005)
result = registry.promote(version, expected_champion=expected, reason="race", actor=version)
print(json.dumps([result.promoted, result.stale, result.reason]))
"""


@pytest.mark.slow
def test_racing_processes_exactly_one_wins(registry, store, tmp_path):
    v1 = log(registry, store, 0)
    registry.promote(v1, expected_champion=None, reason="bootstrap")
    challengers = [log(registry, store, 1, parent=v1), log(registry, store, 2, parent=v1)]
    common = [store["uri"], store["artifacts"], str(store["locks"]), registry.model_name]
    procs = [
        subprocess.Popen(
            [sys.executable, "-c", RACER, *common, v, v1, str(tmp_path)],
            stdout=subprocess.PIPE,
            stderr=subprocess.PIPE,
            text=True,
        )
        for v in challengers
    ]
    deadline = time.monotonic() + 120
    while len(list(tmp_path.glob("ready-*"))) < 2 and time.monotonic() < deadline:
        assert all(p.poll() is None for p in procs), [p.communicate() for p in procs]
        time.sleep(0.02)
    with promotion_lock(registry.model_name, store["locks"]):
        (tmp_path / "go").touch()  # both promoters start at once and must wait for this lock
        time.sleep(2.0)
        assert all(p.poll() is None for p in procs)
        assert registry.champion().version == v1
    outputs = [p.communicate(timeout=120) for p in procs]
    assert [p.returncode for p in procs] == [0, 0], [err[-2000:] for _, err in outputs]
    results = [json.loads(out.strip().splitlines()[-1]) for out, _ in outputs]
    assert sorted((p, s) for p, s, _ in results) == [(False, True), (True, False)]
    champion = registry.champion().version
    assert champion in challengers
    latest = registry.history()[0]
    assert (latest.version, latest.previous, latest.actor) == (champion, v1, champion)


def test_rollback_chain_and_history_survives_restart(registry, store):
    v1 = log(registry, store, 0)
    v2 = log(registry, store, 1, parent=v1)
    v3 = log(registry, store, 2, parent=v2)
    for version, expected in ((v1, None), (v2, v1), (v3, v2)):
        assert registry.promote(version, expected_champion=expected, reason="gate").promoted
    first = registry.rollback(reason="v3 misbehaves", actor="alice")
    assert (first.promoted, first.version, first.previous) == (True, v2, v3)
    assert registry.rollback().version == v1  # v2's predecessor
    assert registry.champion().version == v1
    to3 = registry.rollback(to=v3, reason="v3 was fine after all")
    assert (to3.version, to3.previous) == (v3, v1)
    with pytest.raises(RegistryError, match="--to"):
        registry.rollback()  # v2 and v1 were both rolled back from
    with pytest.raises(RegistryError, match="no version '42'"):
        registry.rollback(to="42")
    assert not registry.rollback(to=v3).promoted  # already champion: nothing recorded
    reopened = new_registry(store, registry.model_name)
    events = reopened.history()
    assert [(e.action, e.version, e.previous) for e in events] == [
        ("rollback", v3, v1),
        ("rollback", v1, v2),
        ("rollback", v2, v3),
        ("promote", v3, v2),
        ("promote", v2, v1),
        ("promote", v1, None),
    ]
    assert events[2].actor == "alice" and events[2].reason == "v3 misbehaves"
    assert reopened.champion().version == v3
    assert [e.version for e in reopened.history(limit=2)] == [v3, v1]


def test_rollback_to_a_rejected_version_is_recorded_as_ungated(registry, store):
    """`rollback --to N` may restore any version, but one the gate rejected is flagged in the
    reason and the history (as a hand move in the MLflow UI is), never made champion silently;
    from the first champion the error says there is nothing earlier, not a false story."""
    v1 = registry.log_version(
        store["checkpoints"][0], lineage={"parent_version": "none", "gate_decision": "pass"}
    ).version
    registry.promote(v1, expected_champion=None, reason="bootstrap")
    with pytest.raises(RegistryError, match="it was the first champion"):
        registry.rollback()
    v2 = registry.log_version(
        store["checkpoints"][1], lineage={"parent_version": v1, "gate_decision": "fail"}
    ).version
    result = registry.rollback(to=v2, reason="typo")
    assert result.promoted and result.version == v2
    assert result.reason.startswith(f"rolled back from v{v1}: UNGATED: v{v2} never passed")
    assert registry.history()[0].reason.startswith("UNGATED:")
    back = registry.rollback(to=v1, reason="fixed")
    assert back.promoted and "UNGATED" not in back.reason


def _events(script: str) -> list[PromotionEvent]:
    """'P2<1 R1<2' = promote v2 replacing v1, roll back to v1 from v2 ('-' = no champion)."""
    actions = {"P": "promote", "R": "rollback"}
    events = []
    for step in script.split():
        version, previous = step[1:].split("<")
        events.append(
            PromotionEvent(
                "t",
                actions[step[0]],
                version,
                None if previous == "-" else previous,
                "test",
                "",
                None,
            )
        )
    return events


@pytest.mark.parametrize(
    ("script", "current", "expected"),
    [
        ("P1<-", "1", None),
        ("P1<- P2<1", "2", "1"),
        ("P1<- P2<1 R1<2 P3<1", "3", "1"),  # gated against the restored champion
        ("P1<- P2<1 P3<2 R2<3 R1<2", "1", None),  # 3 and 2 were both rolled back from
        ("P1<- P2<1 P3<2 R2<3 P4<2 R2<4", "2", "1"),  # 2 was made champion again
        ("P1<2 P2<1", "2", "1"),
        ("P1<2 P2<1 R2<1", "2", None),  # a cycle ends the walk
        ("", "5", None),  # a champion set outside the history
    ],
)
def test_rollback_target(script, current, expected):
    assert rollback_target(_events(script), current) == expected


def test_tampered_artifact_is_never_promoted(registry, store, tmp_path):
    v1 = log(registry, store, 0)
    registry.promote(v1, expected_champion=None, reason="bootstrap")
    v2 = log(registry, store, 1, parent=v1)
    weights = stored_file(registry, v2, "model.safetensors")
    data = bytearray(weights.read_bytes())
    data[-1] ^= 0x01
    weights.write_bytes(bytes(data))
    with pytest.raises(ArtifactIntegrityError, match=r"model\.safetensors: sha256"):
        registry.download(v2, tmp_path / "dl")
    assert not (tmp_path / "dl").exists()
    assert [p.name for p in tmp_path.iterdir()] == []  # no temporary folder left behind
    with pytest.raises(ArtifactIntegrityError, match=r"model\.safetensors"):
        registry.promote(v2, expected_champion=v1, reason="gate passed")
    assert registry.champion().version == v1
    assert len(registry.history()) == 1
    stored_file(registry, v2, "spec.json").unlink()
    (stored_file(registry, v2, "extra.bin")).write_bytes(b"x")
    with pytest.raises(ArtifactIntegrityError, match=r"spec\.json: missing.*extra\.bin: not rec"):
        registry.download(v2, tmp_path / "dl")


def test_versions_aliases_tags_and_status(registry, store):
    v1, v2 = log(registry, store, 0), log(registry, store, 1, parent="1")
    registry.promote(v1, expected_champion=None, reason="bootstrap")
    registry.set_challenger(v2)
    registry.set_version_tags(v2, {"evergreen.decision": "rejected"})
    with pytest.raises(RegistryError, match="integrity"):
        registry.set_version_tags(v2, {"evergreen.sha256.spec.json": "0" * 64})
    with pytest.raises(RegistryError, match="no version"):
        registry.set_challenger("77")
    assert [(v.version, v.aliases) for v in registry.versions()] == [
        (v2, ["challenger"]),
        (v1, ["champion"]),
    ]
    assert registry.aliases() == {"champion": v1, "challenger": v2}
    ledger = Ledger(store["uri"], experiment=f"ledger-{registry.model_name}")
    reasons = "retention accuracy fell 9.0 pts — not shown non-inferior: rejected."
    ledger.record("daily", "2026-11-21", "rejected", details={"version": v2, "reasons": reasons})
    snapshot = status_snapshot(registry, ledger)
    assert json.loads(json.dumps(snapshot)) == snapshot
    assert snapshot["champion"]["version"] == v1
    assert snapshot["versions"][0]["lineage"]["decision"] == "rejected"
    assert snapshot["ledger"][0]["batch_id"] == "2026-11-21"
    console = Console(record=True, width=160)
    render_status(snapshot, console)
    text = console.export_text()
    assert "champion: v1" in text and "2026-11-21" in text and "bootstrap" in text
    assert "retention accuracy fell 9.0 pts" in text  # the ledger says why, not only "rejected"
    narrow = Console(record=True, width=110)  # a common terminal: every header whole
    render_status(snapshot, narrow)
    headers = narrow.export_text().splitlines()
    assert all(len(line) <= 110 for line in headers)  # the ledger's "why" fits or is left out
    eighty = Console(record=True, width=80)
    render_status(snapshot, eighty)
    assert all(len(line) <= 80 for line in eighty.export_text().splitlines())
    for header in ("version", "created", "aliases", "parent", "batches", "gate", "decision"):
        assert any(f" {header} " in line for line in headers), header


def test_ledger_why_shows_the_deciding_sentence_not_every_reason():
    gate = (
        "new-data accuracy rose 6.2 pts (0.875 → 0.938, 95% lower bound −10.8 pts) — not shown "
        "non-inferior: rejected. | The new-data check is underpowered (n=16); this alone does "
        "not block. | retention accuracy rose 1.0 pts — non-inferior."
    )
    rejected = {"outcome": "rejected", "details": {"reasons": gate}}
    assert ledger_why(rejected).startswith("new-data accuracy rose 6.2 pts")
    assert "underpowered" not in ledger_why(rejected)
    discarded = {
        "outcome": "rejected",
        "details": {"reasons": "the update was discarded on its select rows (…): | " + gate},
    }
    assert ledger_why(discarded).startswith("the update was discarded on its select rows (…):")
    assert ledger_why(discarded).endswith("rejected.")
    quarantined = {
        "outcome": "quarantined",
        "details": {"reason": "batch b1: INVALID — column 'f0' has 3 missing values"},
    }
    assert ledger_why(quarantined) == "column 'f0' has 3 missing values"
    failed = {"outcome": "failed", "details": {"error": "OSError: disk full\ntraceback …"}}
    assert ledger_why(failed) == "OSError: disk full"
    assert ledger_why({"outcome": "skipped", "details": {"reasons": "no drift"}}) == "no drift"
    assert ledger_why({"outcome": "promoted", "details": {"reasons": gate}}) == ""
    assert ledger_why({"outcome": "rejected", "details": {}}) == ""


def test_from_config_uses_home_and_names(store, monkeypatch):
    monkeypatch.delenv("EVERGREEN_HOME", raising=False)
    home = store["root"]  # the module's store: no second database to create
    cfg = config_from_dict(
        {
            "home": str(home),
            "data": {"features": FEATURES, "classes": CLASSES},
            "registry": {"name": "digits", "experiment": "exp"},
        }
    )
    registry = Registry.from_config(cfg)
    assert registry.tracking_uri == store["uri"]
    assert (registry.model_name, registry.experiment) == ("digits", "exp")
    assert registry.lock_dir == home / "locks"
    assert registry.artifact_location == store["artifacts"]
    assert registry.champion() is None and registry.versions() == []
    assert Ledger.from_config(cfg).log.experiment == "exp-records"


def test_pyfunc_reports_missing_and_non_numeric_columns(store):
    model = EvergreenPyfunc().load_checkpoint_dir(store["checkpoints"][0])
    with pytest.raises(ValueError, match=r"missing feature columns \['f1', 'f3'\]"):
        model.predict(None, pd.DataFrame({"f0": [1.0], "f2": [2.0]}))
    frame = pd.DataFrame({c: [1.0] for c in FEATURES}).assign(f2=["x"])
    with pytest.raises(ValueError, match=r"\['f2'\] are not numeric"):
        model.predict(None, frame)


def test_pyfunc_refuses_nan_and_inf_features_instead_of_predicting_the_first_class(store):
    """A NaN or ±inf feature gave NaN logits, whose argmax is class 0: a confident-looking
    label with NaN probabilities. The request is refused, naming the columns and rows."""
    model = EvergreenPyfunc().load_checkpoint_dir(store["checkpoints"][0])
    frame = pd.DataFrame({c: [1.0, 2.0, 3.0] for c in FEATURES}, index=[10, 11, 12])
    frame.loc[11, "f1"] = np.nan
    frame.loc[12, "f3"] = np.inf
    with pytest.raises(ValueError, match=r"\['f1', 'f3'\].*rows 11, 12"):
        model.predict(None, frame)
    out = model.predict(None, frame.loc[[10]])
    assert out["probability"].notna().all()


def test_pyfunc_answers_an_empty_request_with_no_rows(store):
    """MLflow's schema enforcement hands an empty frame over as object columns."""
    model = EvergreenPyfunc().load_checkpoint_dir(store["checkpoints"][0])
    empty = pd.DataFrame({c: pd.Series([], dtype=object) for c in FEATURES})
    out = model.predict(None, empty)
    assert len(out) == 0 and out.columns[0] == "prediction"


@pytest.mark.slow
def test_champion_serves_in_a_fresh_interpreter(registry, store):
    version = log(registry, store, 2)
    registry.promote(version, expected_champion=None, reason="bootstrap")
    rows = torch.randn(6, len(FEATURES), generator=torch.Generator().manual_seed(3))
    rows[:, 0] = rows[:, 0].mul(3).round()
    frame = pd.DataFrame(rows.double().numpy(), columns=FEATURES).assign(extra="ignored")
    # integer features (counts, pixels, JSON numbers) must pass MLflow's schema enforcement
    frame[FEATURES[0]] = frame[FEATURES[0]].astype("int64")
    code = (
        "import sys, mlflow, pandas as pd;"
        f"m = mlflow.pyfunc.load_model('models:/{registry.model_name}@champion');"
        "out = m.predict(pd.read_json(sys.stdin, orient='split'));"
        "import continual; print(continual.__file__);"
        "print(out.to_json(orient='split'))"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        input=frame.to_json(orient="split"),
        env={**os.environ, "MLFLOW_TRACKING_URI": store["uri"]},
        cwd=store["root"],
        capture_output=True,
        text=True,
        timeout=240,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    shipped, output = done.stdout.strip().splitlines()[-2:]
    assert Path(shipped).is_relative_to(store["root"] / "mlartifacts")  # the model's own copy
    served = json.loads(output)
    assert served["columns"] == ["prediction", "probability"] + [
        f"probability_{c}" for c in CLASSES
    ]
    model, _ = load_checkpoint(store["checkpoints"][2])
    proba = predict_proba(model, rows.float())
    expected = [CLASSES[i] for i in proba.argmax(dim=1).tolist()]
    assert [row[0] for row in served["data"]] == expected
    assert [row[1] for row in served["data"]] == pytest.approx(proba.max(dim=1).values.tolist())
    every_class = [value for row in served["data"] for value in row[2:]]
    assert every_class == pytest.approx(proba.flatten().tolist(), abs=1e-6)  # logit order
