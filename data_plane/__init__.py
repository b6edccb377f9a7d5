"""The data plane: landing zone I/O, Great Expectations validation, splits/retention, drift.

Modules (imported on demand; Great Expectations loads only when a suite is built or run):

- `landing`: list and read batches from a local folder or `s3://bucket/prefix` (`open_landing`,
  `pending_batches`, `read_batch`, `BatchReadError`), and write them (demo, tests).
- `validation`: the expectation suite file and per-batch `ValidationReport`s.
- `splits`: deterministic hold-out split, content hash, bounded stratified retention set.
- `drift`: per-feature KS + PSI drift report.
"""
