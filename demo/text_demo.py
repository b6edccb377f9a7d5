"""The text demo's timeline and config: `evergreen demo --text` on the packaged MiniLM encoder.

The rows are the real-text timeline of `demo.text_timeline` (sentences of installed packages'
module docstrings, labelled with their package); each batch is given the cadence that picks it
up, in calendar order, so `demo.run` drives it exactly as it drives the digits demo:
bootstrap on two topics, a daily LoRA update when a third topic arrives, a weekly replay + EWC
update when a fourth arrives, a monthly fine-tune + EWC on a mix of all four.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from continual.base_model import resolve_hf_path
from demo.text_timeline import TextBatch, build_text_landing, text_config_dict
from demo.timeline import DemoBatch
from evergreen.errors import ConfigError

# The cadence of each batch of `text_plan`, in order (bootstrap, then one batch per cadence).
TEXT_CADENCES: tuple[str, ...] = ("bootstrap", "daily", "weekly", "monthly")


def describe_topics(topics: dict[str, int], known: set[str]) -> str:
    """One line for a batch: its topics by size, those not seen in earlier batches marked new.

    >>> describe_topics({"torch": 10, "mlflow": 50}, {"torch"})
    'mlflow 50 (new), torch 10'
    """
    ranked = sorted(topics.items(), key=lambda item: (-item[1], item[0]))
    return ", ".join(f"{t} {n}" + ("" if t in known else " (new)") for t, n in ranked)


def as_demo_batches(batches: list[TextBatch]) -> list[DemoBatch]:
    """The text batches as the demo runs and prints them: each with its cadence and topics.

    Raises:
        ValueError: more batches than `TEXT_CADENCES` gives a cadence for.
    """
    if len(batches) > len(TEXT_CADENCES):
        raise ValueError(
            f"{len(batches)} text batches but cadences for {len(TEXT_CADENCES)} only: "
            "extend TEXT_CADENCES with the plan"
        )
    known: set[str] = set()
    out = []
    for batch, cadence in zip(batches, TEXT_CADENCES, strict=False):
        out.append(
            DemoBatch(
                batch_id=batch.batch_id,
                date=batch.batch_id,
                rows=batch.n_rows,
                description=describe_topics(batch.topics, known),
                cadence=cadence,
                fmt=batch.fmt,
            )
        )
        known |= set(batch.topics)
    return out


def build_text_demo_landing(landing: str | Path) -> list[DemoBatch]:
    """Write the text timeline into a local landing folder; the batches with their cadences.

    Raises:
        ConfigError: the packaged model is not installed (said before any flow starts).
    """
    hf_path = text_config_dict(str(landing), "")["model"]["hf_path"]
    try:
        resolve_hf_path(hf_path)
    except FileNotFoundError as exc:
        raise ConfigError(
            f"evergreen demo --text runs the packaged MiniLM encoder ({hf_path}): install it "
            "with pip install 'evergreen[text]' (make demo-text does); " + str(exc)
        ) from exc
    return as_demo_batches(build_text_landing(landing))


def text_demo_config_dict(landing: str, home: str) -> dict[str, Any]:
    """The `evergreen.yaml` mapping of the text demo (validates as `EvergreenConfig`).

    The model and training budgets are `text_config_dict`'s (the integration test's): the
    shipped defaults (600 bootstrap steps of 64 rows, 128 tokens) train a 22M-parameter encoder
    for far longer than a CPU demo can wait, and a few epochs over a few hundred short sentences
    are enough for a pretrained encoder. The gate differs from the defaults for one reason: the
    batches hold 17-30 gate rows, where a 5-pt non-inferiority margin is out of reach (one row is
    3-6 pts, the minimum detectable effect 15-30 pts), so every update would be rejected for lack
    of evidence, not for forgetting. The demo gates at 15 pts with a 15-pt forgetting budget,
    as tests/integration/test_text_pipeline.py does; a real deployment with hundreds of gate
    rows per batch keeps the defaults.
    """
    tree = text_config_dict(landing, home)
    # Weekly and monthly: the `hf` family's own defaults (`evergreen.config_families`: lr 3e-5,
    # λ fixed at 1000) instead of the test's lr 1e-4 and λ 100, and 10 passes over the learning
    # rows instead of 1. Why (docs/TEXT.md, "The text demo"): at lr 1e-4 a few steps moved the
    # boundaries between the old topics (retention −13 to −15 pts at the gate, both updates
    # rejected), λ ≤ 100 barely held the encoder, and with 75 % (weekly) or 50 % (monthly) of
    # each batch replayed one pass over ~45 new rows is 3 steps that see each new row 0.25-0.5
    # times. Tuned on the bench's validation timeline (benchmarks/bench_text_update.py), not
    # on this one.
    for section in ("weekly", "monthly"):
        del tree[section]["ewc_lambda"]
        del tree[section]["train"]["lr"]
        tree[section]["train"]["epochs"] = 10
    tree["registry"] = {
        "tracking_uri": None,
        "name": "evergreen-text",
        "experiment": "evergreen-text-demo",
    }
    tree["gate"] = {
        "new_data_tolerance": 0.15,
        "retention_tolerance": 0.15,
        "forgetting_budget": 0.15,
        "n_bootstrap": 1000,  # as the digits demo: the gate's bootstrap on ~100 rows
    }
    return tree
