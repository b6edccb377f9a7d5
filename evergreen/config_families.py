"""What each model family changes in a config, and the checks that span sections.

`evergreen.config` (with its `config_*` section modules) holds the schema (sections, fields,
their bounds) and loading; its `EvergreenConfig` validator calls these once every section is
parsed: a causal LM's and a pretrained text classifier's defaults (filled in key by key, only
where the file leaves a key unset) and the rules no single section can check on its own
(distillation, the replay mix).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

if TYPE_CHECKING:  # config.py imports this module for its validator (config_data.py too)
    from evergreen.config import EvergreenConfig

CAUSAL_LM_FAMILY = "hf-causal-lm"
# A causal LM learns its text, not labels: its batches carry no label column; the reader fills
# this one placeholder class in (`data_plane.landing.read_batch`), so splits, the data memory
# and validation stay the same code.
TEXT_ONLY_CLASSES = ["text"]
# Weekly default for a causal LM: 50 % new text, 50 % replayed (chosen with the schedule below
# on a validation sequence; 80/20 before it: docs/CAUSAL_LM.md). The daily LoRA keeps 80/20.
CAUSAL_LM_REPLAY_RATIO = 0.5
CAUSAL_LM_DAILY_REPLAY_RATIO = 0.2
# The causal LM's daily LoRA keeps the 150 steps its recipe was measured with (docs/CAUSAL_LM.md)
# unless `daily.train.steps` is set; the classifiers' default is 300 (`DailyConfig`).
CAUSAL_LM_DAILY_STEPS = 150
# Every training run of a causal LM (bootstrap and updates): linear warm-up over 5 % of its
# steps, then cosine decay to 0.1 × lr; an update re-warms and re-decays (docs/CAUSAL_LM.md,
# chosen on a validation domain sequence by `benchmarks.causal_lm_recipe`).
CAUSAL_LM_LR_SCHEDULE: Literal["constant", "cosine"] = "cosine"
CAUSAL_LM_WARMUP_FRACTION = 0.05
# Defaults of a pretrained text classifier (model.family hf), key by key unless set: see
# `text_classifier_defaults` for why.
HF_UPDATE_LR = 3e-5
HF_EWC_LAMBDA = 1000.0
HF_TRAIN_DEFAULTS: dict[str, dict[str, float]] = {  # passes, not step counts: steps 1 = no floor
    "bootstrap": {"steps": 1, "epochs": 4, "batch_size": 16, "lr": 1e-4},
    "daily": {"steps": 1, "epochs": 2, "batch_size": 16, "lr": 1e-3},  # LoRA adapters only
    "weekly": {"steps": 1, "epochs": 10, "batch_size": 16, "lr": HF_UPDATE_LR},
    "monthly": {"steps": 1, "epochs": 10, "batch_size": 16, "lr": HF_UPDATE_LR},
}


# Rank of the daily LoRA adapter unless `daily.lora_r` is set; `daily.lora_alpha` unset is
# LORA_ALPHA_PER_RANK × the rank (the update's scale α/r stays 2 whatever the rank).
# Tabular families: 32, chosen on the validation families through the product
# (`benchmarks.bench_product_quality --cadence daily-lora --set daily.lora_r=32`, seeds 0-2):
# rotate (a domain shift) +1.8 pts average accuracy over rank 8 on every seed, gain +0.1,
# classes-a +0.5 — rank 8 on 64-128-64 layers could neither learn the shift nor keep the old
# tasks as well. Pretrained transformers (hf, hf-causal-lm) keep 8: their adapters sit on
# attention projections hundreds of units wide, where 8 is the usual rank.
TABULAR_LORA_R = 32
PRETRAINED_LORA_R = 8
LORA_ALPHA_PER_RANK = 2


def daily_lora_defaults(cfg: EvergreenConfig) -> None:
    """`daily.lora_r` by model family and `daily.lora_alpha` = 2 × rank, each unless set."""
    daily = cfg.daily
    if "lora_r" not in daily.model_fields_set:
        pretrained = cfg.model.family in ("hf", CAUSAL_LM_FAMILY)
        daily.lora_r = PRETRAINED_LORA_R if pretrained else TABULAR_LORA_R
    if "lora_alpha" not in daily.model_fields_set:
        daily.lora_alpha = LORA_ALPHA_PER_RANK * daily.lora_r


def causal_lm_defaults(cfg: EvergreenConfig) -> None:
    """Check and complete a causal-LM config: text and no classes (the placeholder class is
    filled in); weekly and daily replay `CAUSAL_LM_REPLAY_RATIO` and
    `CAUSAL_LM_DAILY_REPLAY_RATIO` old text unless their `replay_ratio` is set; the daily trains
    `CAUSAL_LM_DAILY_STEPS` unless its `train.steps` is set; every section's
    training warms up and decays its learning rate (`CAUSAL_LM_LR_SCHEDULE`,
    `CAUSAL_LM_WARMUP_FRACTION`) unless its `train` sets them.

    Raises:
        ValueError: features instead of text, or data.classes or data.label set (it learns
            text, not labels).
    """
    if not cfg.data.text:
        raise ValueError(
            "model.family hf-causal-lm learns text: set data.text (the text column) instead of "
            "data.features"
        )
    if cfg.data.classes and not cfg.data.text_only:
        raise ValueError(
            "model.family hf-causal-lm learns the text itself, not labels: remove data.classes "
            f"(got {cfg.data.classes}); batches need only the {cfg.data.text!r} column"
        )
    if cfg.data.label != type(cfg.data).model_fields["label"].default:
        raise ValueError(
            "model.family hf-causal-lm learns the text itself, not labels: remove data.label "
            f"(got {cfg.data.label!r}); batches need only the {cfg.data.text!r} column"
        )
    cfg.data.classes = list(TEXT_ONLY_CLASSES)
    # the classifiers' 0.75 would starve the new text
    if "replay_ratio" not in cfg.weekly.model_fields_set:
        cfg.weekly.replay_ratio = CAUSAL_LM_REPLAY_RATIO
    if "replay_ratio" not in cfg.daily.model_fields_set:
        cfg.daily.replay_ratio = CAUSAL_LM_DAILY_REPLAY_RATIO
    daily_set = cfg.daily.train.model_fields_set if "train" in cfg.daily.model_fields_set else set()
    if "steps" not in daily_set:
        cfg.daily.train.steps = CAUSAL_LM_DAILY_STEPS
    for train in (cfg.bootstrap.train, cfg.weekly.train, cfg.monthly.train, cfg.daily.train):
        if "lr_schedule" not in train.model_fields_set:
            train.lr_schedule = CAUSAL_LM_LR_SCHEDULE
        if "warmup_fraction" not in train.model_fields_set:
            train.warmup_fraction = CAUSAL_LM_WARMUP_FRACTION


def text_classifier_defaults(cfg: EvergreenConfig) -> None:
    """Training of a pretrained text encoder (model.family hf): `HF_TRAIN_DEFAULTS` for every
    training key a section leaves unset, and a fixed λ of `HF_EWC_LAMBDA` for weekly and
    monthly unless set.

    Why (docs/TEXT.md, "The text demo"; tuned on the bench's validation timelines): the
    tabular budgets (600 bootstrap steps of 64 rows at lr 1e-3) fine-tune a 22M-parameter
    encoder far too hard and for far too long on a CPU — a pretrained encoder needs a few
    passes at a small lr (bootstrap 4 at 1e-4; the daily LoRA adapters 2 at 1e-3). Weekly and
    monthly updates train every encoder weight, where the tabular lr (1e-3) rewrites a
    pretrained encoder and even 1e-4, for a few steps, moved the boundaries between similar old
    topics (retention −13 to −15 pts at the demo's gate); with 75 % (weekly) or 50 % (monthly)
    of each batch replayed, one pass sees each new row 0.25–0.5 times, hence 10. And λ: with
    the proximal step a weight drifts at most ~1/(2λF̂) from its anchor, the encoder's
    normalised Fisher F̂ is small (median 0.18; the head takes the mass), so over a text
    update's few dozen small steps the tabular grid (0-100) barely holds the encoder, and
    "auto" picked among four near-identical challengers on a few dozen select rows, at four
    times the cost. λ = 1000 is one challenger that holds it about twice as tightly as 100.
    """
    for name, defaults in HF_TRAIN_DEFAULTS.items():
        section = getattr(cfg, name)
        user_set = section.train.model_fields_set if "train" in section.model_fields_set else set()
        for key, value in defaults.items():
            if key not in user_set:
                setattr(section.train, key, type(getattr(section.train, key))(value))
    for section in (cfg.weekly, cfg.monthly):
        if "ewc_lambda" not in section.model_fields_set:
            section.ewc_lambda = HF_EWC_LAMBDA


def check_distillation(cfg: EvergreenConfig) -> None:
    """Distillation runs on causal LMs, in one process.

    Raises:
        ValueError: `<section>.distill_weight` > 0 for another family (a classifier's head is
            re-fitted before each update, and a teacher with the old head would pull it back),
            or with `<section>.train.processes` > 1 (the torchrun ranks carry no teacher).
    """
    for name in ("daily", "weekly", "monthly"):
        section = getattr(cfg, name)
        if section.distill_weight <= 0:
            continue
        if cfg.model.family != CAUSAL_LM_FAMILY:
            raise ValueError(
                f"{name}.distill_weight is set but distillation from the champion is wired for "
                f"model.family {CAUSAL_LM_FAMILY} only (got {cfg.model.family!r}): set it to 0"
            )
        if section.train.processes > 1:
            raise ValueError(
                f"{name}.distill_weight needs {name}.train.processes: 1 (distributed training "
                f"carries no teacher), got {section.train.processes}"
            )


def new_rows_per_step(batch_size: int, replay_ratio: float) -> int:
    """New rows in each training step's batch: the loop's replay mixing
    (`continual.replay.mix_batch`) replaces round(r·B) of its B rows with replayed ones.

    Raises:
        ValueError: no new row is left in a batch (the update would never learn its rows).
    """
    new = batch_size - round(replay_ratio * batch_size)
    if new < 1:
        raise ValueError(
            f"replay_ratio {replay_ratio} of batch_size {batch_size} leaves no new row in a "
            "batch: lower replay_ratio or raise train.batch_size"
        )
    return new


def check_replay_mix(cfg: EvergreenConfig) -> None:
    """Every replaying section keeps at least one new row per batch (`new_rows_per_step`).

    Raises:
        ValueError: `<section>.replay_ratio` leaves no new row in `<section>.train.batch_size`.
    """
    for name in ("daily", "weekly", "monthly"):
        section = getattr(cfg, name)
        try:
            new_rows_per_step(section.train.batch_size, section.replay_ratio)
        except ValueError as exc:
            raise ValueError(f"{name}: {exc}") from None
