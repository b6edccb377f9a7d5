"""Prefect flows, one file per cadence of the decision table, and the `evergreen` CLI."""
