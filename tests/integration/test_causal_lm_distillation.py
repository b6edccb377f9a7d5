"""Distillation from the previous champion through the CLI, on the tiny Llama.

bootstrap → daily-lora → weekly-replay with `daily.distill_weight` and `weekly.distill_weight`
set, each through `evergreen.cli.main` (embedded Prefect and MLflow): every run succeeds and
decides, the distillation term is computed on every training step of the two updates (a spy
on `TokenDistiller.loss` counts calls; the real loss still runs) and never in the bootstrap,
which has no champion to learn from. The effect itself (KL to the champion with and without
the term) is measured in `tests/unit/test_causal_lm.py`.
"""

from __future__ import annotations

import pandas as pd
import pytest
import yaml

from continual.distillation import TokenDistiller
from evergreen.config import load_config
from model_registry.ledger import Ledger
from tests.tiny_llama import sentences, tiny_llama

pytestmark = [pytest.mark.integration, pytest.mark.slow]


def test_updates_distill_from_the_champion_through_the_cli(tmp_path, monkeypatch):
    tiny_llama(tmp_path / "tiny-llama")
    batches = []
    for i, domain in enumerate(["kitchen", "harbour", "office"]):
        directory = tmp_path / "landing" / f"2026-11-{i + 1:02d}"
        directory.mkdir(parents=True)
        frame = pd.DataFrame({"text": sentences(domain, 60, seed=i)})
        frame.to_parquet(directory / "part-0.parquet", index=False)
        (directory / "_SUCCESS").touch()
        batches.append(directory.name)
    train = {"epochs": 2, "steps": 1, "batch_size": 16, "lr": 3e-3}
    distill = {"distill_weight": 0.5, "distill_temperature": 2.0}
    tree = {
        "home": str(tmp_path / "home"),
        "data": {"landing": str(tmp_path / "landing"), "text": "text", "min_rows": 20},
        "model": {"family": "hf-causal-lm", "hf_path": str(tmp_path / "tiny-llama")},
        "registry": {"name": "lm-distill", "experiment": "lm-distill"},
        "bootstrap": {"train": {**train, "epochs": 6}},
        "daily": {"train": {**train, "lr": 1e-2}, **distill},
        "weekly": {"train": dict(train), **distill},
        "gate": {"new_data_tolerance": 0.3, "retention_tolerance": 0.3, "forgetting_budget": 0.3},
    }
    config = tmp_path / "evergreen.yaml"
    config.write_text(yaml.safe_dump(tree, sort_keys=False))
    calls: list[float] = []
    real_loss = TokenDistiller.loss

    def counted(self, inputs, student_logits, task_loss):
        calls.append(self.weight)
        return real_loss(self, inputs, student_logits, task_loss)

    monkeypatch.setattr(TokenDistiller, "loss", counted)
    from evergreen.cli import main

    ledger = Ledger.from_config(load_config(config))
    for cadence, batch in [("bootstrap", 0), ("daily-lora", 1), ("weekly-replay", 2)]:
        before = len(calls)
        command = ["run", cadence, "--batch", batches[batch], "--config", str(config)]
        assert main(command) == 0, cadence
        if cadence == "bootstrap":
            assert len(calls) == before  # nothing to distil from yet
            continue
        assert len(calls) > before, f"{cadence} trained without the distillation term"
        assert set(calls[before:]) == {0.5}
        decisions = [e.outcome for e in ledger.entries(cadence)]
        assert decisions and decisions[0] in {"promoted", "rejected"}, decisions
