"""Continual-learning algorithms in plain PyTorch: tensors and files in, tensors and dataclasses out.

Nothing here knows about Prefect, MLflow or the landing zone, and nothing is re-exported: import
from the module you need (keeps `import continual` cheap; peft/transformers load only on use).

- `models`: `ModelSpec` and the model families (MLP, tabular transformer, local Hugging Face
  encoder, or any "package.module:factory"), built by name from one registry.
- `checkpoint`: a model version on disk (`spec.json` + `model.safetensors` + optional `adapter/`).
- `training`: the one training loop (steps, not epochs; EWC/replay/distillation as arguments)
  and the prediction helpers the gate and drift monitor use.
- `fisher`: per-example diagonal Fisher (chunked vmap; `fisher_linear`: the closed form for
  `nn.Linear`; `fisher_kinds`: empirical/true/sampled; `fisher_reference`: brute force).
- `ewc`: online EWC penalty and its saved state (monthly/weekly cadences).
- `replay`: reservoir / class-balanced replay buffer and batch mixing (weekly cadence).
- `lora`: online LoRA via peft with validation gating, merge, save/load (daily cadence).
- `lora_merge`: adapters as ΔW = scaling·B·A: deltas, their Fisher, back to an adapter.
- `distillation`: knowledge distillation from a frozen teacher (LwF).
- `streaming`: EMA teacher of the weights (real-time cadence).
- `page_hinkley`: the Page-Hinkley detector and its threshold calibration.
- `drift`: the drift monitor with a lifetime false-alarm budget (alpha spending).
- `merging`: linear interpolation, EMA over a lineage, Fisher-weighted merge.
- `metrics`: accuracy matrix, forgetting, backward transfer, negative flip rate.
- `gating`: the champion-vs-challenger promotion decision.
- `paired_tests`: McNemar/Newcombe and the paired bootstrap the gate uses.
- `gate_power`: operating characteristics of the gate (simulated promotion rates).
"""
