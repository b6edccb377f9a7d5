"""The text demo's four cadences in one process, on a validation timeline that is not the demo's.

Runs the product's own training tasks (`tasks.train_*`: bootstrap, daily LoRA, weekly replay + EWC,
monthly fine-tune + EWC) and its promotion gate (`tasks.evaluate`) on the text demo's config,
without Prefect, MLflow or the landing zone, so a setting can be tried in a minute or two
instead of a five-minute demo. The timeline is `demo.text_timeline`'s plan on other installed
packages (default numpy, sympy → sqlalchemy → matplotlib), so tuning on it does not tune on the
demo. Besides the gate rows (what the demo scores), every topic gets up to `--spare` further
sentences that no batch holds: a larger, less noisy test set.

    OMP_NUM_THREADS=1 nice -n 10 python -m benchmarks.bench_text_update \
        [--topics numpy,sympy,sqlalchemy,matplotlib] [--set weekly.train.lr=3e-5 ...] \
        [--stop-after daily]

Prints one line per cadence (gate decision, retention and new accuracy on the gate rows; for the
daily also its select-row check, which discards an adapter before the gate, and the trained
adapter's figures whether kept or not) and, at the end, the champion's and joint training's
accuracy per batch and per topic. `--stop-after daily` ends the timeline after the daily batch:
one bootstrap and one daily per variant.
"""

from __future__ import annotations

import argparse
import copy
import json
import logging
import tempfile
import time
from dataclasses import replace
from typing import Any

import pandas as pd
import torch

import tasks.evaluate
import tasks.train
import tasks.train_bootstrap
import tasks.train_ewc
import tasks.train_lora
import tasks.train_start
from continual.inference import accuracy
from continual.training import train
from data_plane.splits import ThreeWaySplit, split_three_way
from demo.text_demo import TEXT_CADENCES, text_demo_config_dict
from demo.text_timeline import make_text_frames
from evergreen.config import EvergreenConfig
from tasks.common import frame_to_tensors
from tasks.memory import DataMemory
from tasks.state import ModelState, make_trainable
from tasks.validate import PreparedData

VALIDATION_TOPICS = ["numpy", "sympy", "sqlalchemy", "matplotlib"]
_log = logging.getLogger("bench_text_update")


def _quiet_logger() -> logging.Logger:
    return _log


def config(topics: list[str], sets: list[str], home: str) -> EvergreenConfig:
    """The text demo's config on `topics`, with dotted `key=value` overrides (JSON values)."""
    tree: dict[str, Any] = text_demo_config_dict(home + "/landing", home)
    tree["data"]["classes"] = topics
    for assignment in sets:
        key, value = assignment.split("=", 1)
        *path, last = key.split(".")
        node = tree
        for part in path:
            node = node.setdefault(part, {})
        try:
            node[last] = json.loads(value)
        except json.JSONDecodeError:
            node[last] = value
    return EvergreenConfig.model_validate(tree)


def _split(cfg: EvergreenConfig, frame: pd.DataFrame) -> ThreeWaySplit:
    return split_three_way(
        frame,
        [str(cfg.data.text), cfg.data.label],
        select_fraction=cfg.data.select_fraction,
        gate_fraction=cfg.data.gate_fraction,
        salt=cfg.data.split_salt,
    )


def _accuracy(
    cfg: EvergreenConfig, model: torch.nn.Module, spec: Any, frame: pd.DataFrame
) -> float:
    X, y = frame_to_tensors(frame, spec, cfg.data.label)
    return accuracy(model, X, y)


def _merged(state: ModelState) -> ModelState:
    """A promoted LoRA version as the registry loads it: the adapter folded into the weights."""
    if not hasattr(state.model, "merge_and_unload"):
        return state
    from continual.lora import merge_adapter

    model = make_trainable(merge_adapter(copy.deepcopy(state.model))).eval()  # type: ignore[arg-type]
    return replace(state, model=model)


def run(
    cfg: EvergreenConfig,
    topics: list[str],
    spare: int,
    *,
    joint: bool = True,
    stop_after: str | None = None,
) -> dict[str, Any]:
    """Bootstrap → daily → weekly → monthly on the timeline; figures of each step and the end.

    `stop_after` (a cadence) ends the timeline after that cadence's batch: the end figures
    (and joint training) are then of the batches so far.
    """
    frames = make_text_frames(1, topics, spare=spare)
    test = frames.pop()
    if stop_after is not None:
        frames = frames[: TEXT_CADENCES.index(stop_after) + 1]
    splits = [_split(cfg, f) for f in frames]
    batch_ids = [f"b{i}" for i in range(len(frames))]
    memory, champion, steps = DataMemory(), None, []
    for cadence, batch_id, frame, split in zip(
        TEXT_CADENCES[: len(frames)], batch_ids, frames, splits, strict=True
    ):
        started = time.perf_counter()
        data = PreparedData([batch_id], {batch_id: split}, {batch_id: frame}, data_hash=batch_id)
        memory = memory.remember(cfg, batch_id, split, frame)
        step: dict[str, Any] = {"cadence": cadence}
        if champion is None:
            champion = tasks.train_bootstrap.train_first_model.fn(cfg, data, memory)
            step["champion_topics"] = _topics(cfg, champion, test, topics)
            step["seconds"] = round(time.perf_counter() - started, 1)
            steps.append(step)
            print(json.dumps(step), flush=True)
            continue
        if cadence == "daily":
            judged: dict[str, Any] = {}
            judge = tasks.train_lora._selection_decision
            tasks.train_lora._selection_decision = _recording(
                judge, judged, cfg, splits[: len(steps) + 1], test, topics
            )
            try:
                challenger, check = tasks.train_lora.train_lora_gated.fn(
                    cfg, champion, data, memory
                )
            finally:
                tasks.train_lora._selection_decision = judge
            step["check"] = {k: _round(v) for k, v in _decision_figures(check).items()}
            step["adapter"] = judged
        else:
            trainer = (
                tasks.train_ewc.train_replay_ewc
                if cadence == "weekly"
                else tasks.train_ewc.train_finetune_ewc
            )
            challenger, metrics = trainer.fn(cfg, champion, data, memory)
            step["lambda"] = metrics.get("ewc.lambda")
        if challenger is None:
            step["outcome"] = "discarded"
        else:
            evaluation = tasks.evaluate.evaluate_against_champion.fn(
                cfg, champion, challenger, memory
            )
            d = evaluation.decision
            step["outcome"] = "promoted" if d.promote else "rejected"
            step["gate"] = {k: _round(v) for k, v in _decision_figures(d).items()}
            step["challenger_topics"] = _topics(cfg, challenger, test, topics)
            if d.promote:
                champion = _merged(evaluation.challenger)
        step["champion_topics"] = _topics(cfg, champion, test, topics)
        step["seconds"] = round(time.perf_counter() - started, 1)
        steps.append(step)
        print(json.dumps(step), flush=True)
    assert champion is not None
    final = {
        b: _accuracy(cfg, champion.model, champion.spec, s.gate)
        for b, s in zip(batch_ids, splits, strict=True)
    }
    out: dict[str, Any] = {
        "steps": steps,
        "champion_batches": {k: round(v, 3) for k, v in final.items()},
        "champion_average": round(sum(final.values()) / len(final), 3),
        "champion_topics": _topics(cfg, champion, test, topics),
    }
    if not joint:
        return out
    model = _joint(cfg, champion, splits)
    joint_final = {
        b: _accuracy(cfg, model, champion.spec, s.gate)
        for b, s in zip(batch_ids, splits, strict=True)
    }
    return {
        **out,
        "joint_batches": {k: round(v, 3) for k, v in joint_final.items()},
        "joint_average": round(sum(joint_final.values()) / len(joint_final), 3),
        "joint_topics": _topics(cfg, ModelState(model, champion.spec), test, topics),
    }


def _recording(
    judge: Any,
    into: dict[str, Any],
    cfg: EvergreenConfig,
    splits: list[ThreeWaySplit],
    test: pd.DataFrame,
    topics: list[str],
) -> Any:
    """`judge` (the daily's select-row check), also recording the trained adapter's gate-row
    accuracy per batch and test-row accuracy per topic before the check keeps or discards it."""

    def recorded(
        cfg_: EvergreenConfig, champion: ModelState, selection: Any, candidate: torch.nn.Module
    ) -> Any:
        decision = judge(cfg_, champion, selection, candidate)
        into["batches"] = {
            f"b{i}": round(_accuracy(cfg, candidate, champion.spec, s.gate), 3)
            for i, s in enumerate(splits)
        }
        into["topics"] = _topics(cfg, ModelState(candidate, champion.spec), test, topics)
        return decision

    return recorded


def _decision_figures(decision: Any) -> dict[str, Any]:
    keep = ("champion_mean", "challenger_mean", "ci_low", "n")
    metrics = decision.to_metrics()
    figures: dict[str, Any] = {
        k.removeprefix("gate."): v for k, v in metrics.items() if k.rsplit(".", 1)[-1] in keep
    }
    figures["reasons"] = [r[:160] for r in decision.reasons if "fail" in r or "reject" in r]
    return figures


def _round(value: Any) -> Any:
    return round(value, 3) if isinstance(value, float) else value


def _topics(
    cfg: EvergreenConfig, state: ModelState, test: pd.DataFrame, topics: list[str]
) -> dict[str, float]:
    model = state.model
    out = {t: round(_accuracy(cfg, model, state.spec, test[test.label == t]), 3) for t in topics}
    out["mean"] = round(sum(out.values()) / len(topics), 3)
    return out


def _joint(
    cfg: EvergreenConfig, champion: ModelState, splits: list[ThreeWaySplit]
) -> torch.nn.Module:
    """The demo's joint reference (`demo.baselines.joint_rows`) after the last batch."""
    from continual.models import build_model

    frame = pd.concat([s.train for s in splits], ignore_index=True)
    torch.manual_seed(cfg.bootstrap.train.seed)
    model = build_model(champion.spec)
    X, y = frame_to_tensors(frame, champion.spec, cfg.data.label)
    train(model, X, y, tasks.train.settings_from(cfg.bootstrap.train, len(X)))
    return model


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n", 1)[0])
    parser.add_argument("--topics", default=",".join(VALIDATION_TOPICS))
    parser.add_argument("--set", action="append", default=[], dest="sets")
    parser.add_argument("--spare", type=int, default=150)
    parser.add_argument(
        "--no-joint", action="store_true", help="skip the joint reference (its figures are fixed)"
    )
    parser.add_argument(
        "--stop-after",
        choices=TEXT_CADENCES[:-1],
        help="end the timeline after this cadence (e.g. daily: one bootstrap and one daily)",
    )
    args = parser.parse_args(argv)
    topics = args.topics.split(",")
    tasks.train.get_run_logger = _quiet_logger  # type: ignore[attr-defined,assignment]
    tasks.train_ewc.get_run_logger = _quiet_logger  # type: ignore[attr-defined,assignment]
    tasks.train_start.get_run_logger = _quiet_logger  # type: ignore[attr-defined,assignment]
    tasks.evaluate.get_run_logger = _quiet_logger  # type: ignore[attr-defined,assignment]
    tasks.train_lora.get_run_logger = _quiet_logger  # type: ignore[attr-defined,assignment]
    started = time.perf_counter()
    with tempfile.TemporaryDirectory() as home:
        result = run(
            config(topics, args.sets, home),
            topics,
            args.spare,
            joint=not args.no_joint,
            stop_after=args.stop_after,
        )
    result["seconds"] = round(time.perf_counter() - started, 1)
    result["sets"] = args.sets
    print(json.dumps({k: v for k, v in result.items() if k != "steps"}))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
