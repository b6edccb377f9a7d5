"""Prefect flows, one file per cadence of the decision table, and the `evergreen` CLI."""

import evergreen  # noqa: F401  first: it chooses Arrow's memory pool before pyarrow loads
