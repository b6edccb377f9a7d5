"""The commented example `evergreen init` writes (every key is validated by evergreen.config)."""

CONFIG_TEMPLATE = """\
# evergreen.yaml — one file configures every flow. Validate by running `evergreen status`.
# Every key can be overridden per command: --set key=value (value parsed as YAML).

home: .evergreen                  # state: MLflow store, artifacts, reports (env EVERGREEN_HOME overrides)

data:
  landing: ./landing              # local folder or s3://bucket/prefix; batches live in <landing>/<batch_id>/
  features: [f0, f1, f2, f3]      # numeric feature columns the model reads
  label: label                    # label column
  classes: [0, 1, 2]              # every class the model may predict (order = logit order)
  holdout_fraction: 0.25          # share of each batch held out (by row hash: stable under reruns)
  retention_per_batch: 200        # held-out rows per batch kept to measure forgetting
  retention_max_rows: 3000        # bound on the whole retention set
  min_rows: 20                    # a batch with fewer rows is quarantined
  max_duplicate_fraction: 0.2     # tolerated share of duplicate rows
  feature_bounds: {}              # optional {feature: [min, max]}; else inferred at bootstrap (±50% of range)

model:
  family: mlp                     # mlp | transformer | package.module:factory
  hidden: [128, 64]               # mlp hidden sizes
  # transformer: d_model: 32, n_heads: 4, n_layers: 2, n_tokens: 8

registry:
  tracking_uri: null              # null = embedded SQLite under home; e.g. http://mlflow:5000
  name: evergreen                 # registered model name; serve models:/<name>@champion
  experiment: evergreen

bootstrap_train: {steps: 600, batch_size: 64, lr: 0.001}

monthly:                          # full fine-tune + online EWC
  train: {steps: 400, lr: 0.001}
  ewc_lambda: 1000.0              # per-example Fisher: typical 1e2..1e4; tune on past-batch holdout
  fisher_decay: 0.9               # F = gamma * F_old + F_new

weekly:                           # experience replay + EWC
  train: {steps: 300, lr: 0.001}
  ewc_lambda: 500.0
  replay_capacity: 2000
  replay_ratio: 0.4
  replay_policy: reservoir        # reservoir | class_balanced

daily:                            # online LoRA with validation gating
  train: {steps: 150, lr: 0.003}
  lora_r: 8
  lora_alpha: 16
  target_modules: null            # null: q_proj/v_proj where present, else every Linear but the head
  replay_ratio: 0.3
  max_regression: 0.01             # validation accuracy the adapter may lose before it is discarded

stream:                           # Page-Hinkley on the champion's per-sample loss + EMA weights
  ema_decay: 0.99
  ph_delta: 0.005
  ph_threshold: null              # null: calibrated on the retention set (1% false alarms)
  micro_batch: 16

consolidate: {mode: ema, decay: 0.5, alpha: 0.5, lineage: 3}

gate:                             # paired tests on per-example correctness
  new_data_tolerance: 0.01        # allowed accuracy drop on the new batch's holdout
  retention_tolerance: 0.02       # allowed drop on the retention set (forgetting)
  confidence: 0.95
  min_accuracy: 0.0               # floor for the first champion
"""
