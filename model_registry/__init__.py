"""MLflow side of evergreen: model versions, aliases, promotion/rollback, history, batch ledger.

- `registry.Registry`: log checkpoints as pyfunc versions with lineage and sha256 tags, move the
  `champion`/`challenger` aliases by compare-and-set, roll back.
- `versions.RegistryReader` (the base of `Registry`): read versions, aliases and the promotion
  history; download a version verified against its sha256 tags, base model and parent version.
- `ledger.Ledger`: which batches each cadence processed.
- `locking.promotion_lock`: the host-local lock around champion changes.
- `pyfunc_model`: the "models from code" file every version serves with.
- `status`: the data and tables behind `evergreen status`.

Nothing here imports Prefect: flows and tasks add orchestration (and the global concurrency
limit) on top.
"""
