"""The data plane: landing zone I/O, Great Expectations validation, splits/retention, drift.

Modules (imported on demand; Great Expectations loads only when a suite is built or run):

- `landing`: list and read batches from a local folder or `s3://bucket/prefix` (`open_landing`,
  `read_batch`, `BatchReadError`), and write them (demo, tests).
- `arrival`: which batches have fully arrived (`_SUCCESS`, `_manifest.json`, quiescence) and are
  pending (`pending_batches`, `batch_arrivals`).
- `validation`: per-batch validation (integrity blocks, change informs) into `ValidationReport`s,
  and the report files; `gx_suite`: the integrity suite file (built from the config, upgraded);
  `gx_run`: running it through a GX Checkpoint, with Data Docs.
- `splits`: deterministic hold-out split, content hash, bounded stratified retention set.
- `drift`: per-feature KS + PSI drift report.
"""
