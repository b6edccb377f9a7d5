"""Continual pre-training of a causal LM (`hf-causal-lm`) through the cadences, by the CLI.

A tiny Llama-style model (hidden 32, 2 layers, 4 heads) built from `LlamaConfig` with a WordLevel
tokenizer made offline, saved to a temporary directory; three batches of ~100 short sentences
from three "domains" (different word pools), text only (no label column, no classes):
bootstrap → daily-lora → weekly-replay → merge (Fisher, linear, TIES) → consolidate → stream-monitor →
rollback, each through `evergreen.cli.main`; the champion's pyfunc scores a `text` column
(log-likelihood and perplexity) in a fresh process before the merges.
"""

from __future__ import annotations

import io
import subprocess
import sys
from pathlib import Path

import numpy as np
import pandas as pd
import pytest
import yaml

from evergreen.config import load_config
from model_registry.ledger import Ledger
from model_registry.registry import Registry
from tests.tiny_llama import DOMAINS, GLUE, sentences, tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]


@pytest.fixture(scope="module")
def pipeline(tmp_path_factory):
    root = tmp_path_factory.mktemp("lm")
    tiny_llama(root / "tiny-llama")
    batches = []
    for i, domain in enumerate(["kitchen", "harbour", "office"]):
        batch_id = f"2026-11-{i + 1:02d}"
        directory = root / "landing" / batch_id
        directory.mkdir(parents=True)
        frame = pd.DataFrame({"text": sentences(domain, 100, seed=i)})
        frame.to_parquet(directory / "part-0.parquet", index=False)
        (directory / "_SUCCESS").touch()
        batches.append(batch_id)
    train = {"epochs": 3, "steps": 1, "batch_size": 16, "lr": 3e-3}
    tree = {
        "home": str(root / "home"),
        "data": {"landing": str(root / "landing"), "text": "text", "min_rows": 20},
        "model": {
            "family": "hf-causal-lm",
            "hf_path": str(root / "tiny-llama"),
            "max_length": 32,
        },
        "registry": {"name": "lm-test", "experiment": "lm-test"},
        "bootstrap": {"train": {**train, "epochs": 10}},
        "daily": {"train": {**train, "lr": 1e-2}},
        "weekly": {"train": dict(train)},
        # tolerances in nats of mean token log-likelihood; forgetting budget: perplexity +35 %
        "gate": {
            "new_data_tolerance": 0.3,
            "retention_tolerance": 0.3,
            "forgetting_budget": 0.3,
        },
    }
    config = root / "evergreen.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    cfg = load_config(config)
    return {
        "config": str(config),
        "cfg": cfg,
        "batches": batches,
        "registry": Registry.from_config(cfg),
        "ledger": Ledger.from_config(cfg),
        "root": root,
    }


def _cli(pipeline, *args: str) -> None:
    from evergreen.cli import main

    assert main(["run", *args, "--config", pipeline["config"]]) == 0


def _champion(pipeline) -> str | None:
    champion = pipeline["registry"].champion()
    return champion.version if champion else None


def test_config_has_no_classes_and_replays_half(pipeline):
    cfg = pipeline["cfg"]
    assert cfg.data.text_only and cfg.weekly.replay_ratio == pytest.approx(0.5)


def test_01_bootstrap_learns_the_text(pipeline):
    _cli(pipeline, "bootstrap", "--batch", pipeline["batches"][0])
    assert _champion(pipeline) is not None


@pytest.mark.parametrize(("cadence", "batch"), [("daily-lora", 1), ("weekly-replay", 2)])
def test_02_03_updates_decide_on_log_likelihood(pipeline, cadence, batch):
    before = _champion(pipeline)
    _cli(pipeline, cadence, "--batch", pipeline["batches"][batch])
    decisions = [e.outcome for e in pipeline["ledger"].entries(cadence)]
    assert decisions and decisions[0] in {"promoted", "rejected"}, decisions
    assert (_champion(pipeline) != before) == (decisions[0] == "promoted")


def _version_of(pipeline, cadence: str):
    return next(
        v for v in pipeline["registry"].versions() if v.tags["evergreen.cadence"] == cadence
    )


def test_03b_weekly_carries_an_ewc_fisher_and_daily_only_its_adapter(pipeline, tmp_path):
    """Weekly replay trains with EWC (the Fisher of per-sequence next-token NLL) and stores the
    accumulated Fisher; the daily LoRA version on the fine-tuned bootstrap champion is stored as
    parent reference + adapter, not as the champion's weights again."""
    from safetensors.torch import load_file

    from continual.lineage import PARENT_FILE, ParentReference

    registry = pipeline["registry"]
    weekly = _version_of(pipeline, "weekly-replay")
    checkpoint = registry.download(weekly.version, tmp_path / "weekly")
    fisher = {k: v for k, v in load_file(str(checkpoint / "ewc.safetensors")).items()}
    assert any(k.startswith("fisher.") for k in fisher), sorted(fisher)[:5]
    assert all(bool(v.isfinite().all()) for v in fisher.values())
    metrics = registry.client.get_run(weekly.run_id).data.metrics
    assert "ewc.lambda" in metrics, sorted(metrics)  # λ calibrated on select rows, not ignored
    assert metrics["ewc.own_fisher_mean"] > 0 and metrics["ewc.fisher_entries"] > 0
    daily = _version_of(pipeline, "daily-lora")
    checkpoint = registry.download(daily.version, tmp_path / "daily")
    reference = ParentReference.from_json((checkpoint / PARENT_FILE).read_text())
    assert reference.version == daily.tags["evergreen.parent_version"]
    assert not (checkpoint / "base.json").exists()


def test_04_champion_scores_text_in_a_fresh_process(pipeline):
    cfg = pipeline["cfg"]
    texts = [*sentences("kitchen", 3, seed=0), "stapler memo budget desk"]
    code = (
        "import mlflow, pandas as pd;"
        f"mlflow.set_tracking_uri({cfg.tracking_uri!r});"
        f"m = mlflow.pyfunc.load_model('models:/{cfg.registry.name}@champion');"
        f"print(m.predict(pd.DataFrame({{'text': {texts!r}}})).to_json())"
    )
    done = subprocess.run(
        [sys.executable, "-c", code],
        capture_output=True,
        text=True,
        cwd=Path(__file__).resolve().parents[2],
        timeout=300,
    )
    assert done.returncode == 0, done.stderr[-3000:]
    out = pd.read_json(io.StringIO(done.stdout.strip().splitlines()[-1]))
    assert list(out.columns) == ["log_likelihood", "perplexity"]
    assert np.all(out["log_likelihood"] < 0)
    np.testing.assert_allclose(out["perplexity"], np.exp(-out["log_likelihood"]), rtol=1e-6)
    vocab = sum(len(w) for w in DOMAINS.values()) + len(GLUE) + 4
    assert out["perplexity"].iloc[:3].max() < vocab  # better than a uniform guess on seen text


@pytest.mark.parametrize("method", ["fisher", "linear", "ties"])
def test_04b_merge_of_the_daily_adapter_and_the_weekly_version_is_gated(pipeline, method):
    """`evergreen run merge` on the daily LoRA version (an adapter on v1, folded on load: its
    ΔW merged) and the weekly fine-tune, weighted by their own Fishers, plainly averaged, or by
    TIES on their changes to their common ancestor (the bootstrap version): one decision on
    log-likelihood each."""
    registry = pipeline["registry"]
    daily = _version_of(pipeline, "daily-lora").version
    weekly = _version_of(pipeline, "weekly-replay").version
    before = _champion(pipeline)
    _cli(pipeline, "merge", "--versions", daily, weekly, "--method", method)
    merged = max(  # the newest merge version
        (v for v in registry.versions() if v.tags["evergreen.cadence"] == "merge"),
        key=lambda v: int(v.version),
    )  # a merge reads no batch: no ledger row, the
    decision = merged.tags["evergreen.decision"]  # decision is on the version it registered
    assert decision in {"promoted", "rejected"}, merged.tags
    metrics = registry.client.get_run(merged.run_id).data.metrics
    assert {f"merge.distance.v{daily}", f"merge.distance.v{weekly}"} <= set(metrics), metrics
    if method == "ties":
        bootstrap = _version_of(pipeline, "bootstrap").version
        assert f"merge.ancestor.v{bootstrap}" in metrics and 0 < metrics["merge.kept_fraction"] < 1
    assert metrics["gate.promote"] == float(decision == "promoted")
    assert (_champion(pipeline) != before) == (decision == "promoted")
    assert registry.challenger() is None  # a decided merge leaves no challenger alias


def test_04c_consolidate_over_the_champion_lineage_is_gated(pipeline):
    """`evergreen run consolidate` (EMA over the recent champions: v1 and the weekly v3, full
    weights of one base) on the same home: a registered challenger with one decision."""
    registry = pipeline["registry"]
    before = _champion(pipeline)
    _cli(pipeline, "consolidate")
    version = _version_of(pipeline, "consolidate")
    decision = version.tags["evergreen.decision"]
    assert decision in {"promoted", "rejected"}, version.tags
    metrics = registry.client.get_run(version.run_id).data.metrics
    assert "consolidate.distance" in metrics and metrics["gate.promote"] == float(
        decision == "promoted"
    )
    assert (_champion(pipeline) != before) == (decision == "promoted")


def test_04d_stream_monitor_reads_per_row_token_nll(pipeline):
    """`evergreen run stream-monitor` on one batch: the drift statistic is each row's mean
    next-token NLL under the champion, the online SGD step the next-token loss; recorded in
    the ledger like any batch the cadence processed."""
    batch = pipeline["batches"][1]
    _cli(pipeline, "stream-monitor", "--batch", batch)
    entries = [e for e in pipeline["ledger"].entries("stream-monitor") if e.batch_id == batch]
    assert len(entries) == 1, entries
    # no drift and drift are both recorded as skipped (no challenger without --promote-ema)
    assert entries[0].outcome == "skipped", entries


def test_05_some_update_was_promoted_and_rollback_restores(pipeline):
    from evergreen.cli import main

    history = pipeline["registry"].history()
    assert len(history) >= 2, "no update passed the gate"
    current = _champion(pipeline)
    assert main(["run", "rollback", "--config", pipeline["config"]]) == 0
    restored = _champion(pipeline)
    assert restored not in {None, current}
    # the alias, the version's aliases and the promotion history agree on the restored champion
    registry = pipeline["registry"]
    assert registry.aliases().get("champion") == restored
    assert registry.history()[0].action == "rollback"
    assert registry.history()[0].version == restored
    assert registry.get_version(restored).aliases == ["champion"]
    assert registry.challenger() is None
