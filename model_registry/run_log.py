"""A log of small records kept in MLflow: each record one finished, tags-only run.

The storage under the batch ledger (`model_registry.ledger`), the promotion history
(`model_registry.promotion_history`) and the data-memory snapshots: records survive process
restarts, work through a remote `mlflow server` exactly like against the embedded SQLite store,
and show up in the MLflow UI. Records are ordered by a `seq` metric (microseconds since the
epoch, strictly increasing per writer), so two records written within the same millisecond
still have a defined order.
"""

from __future__ import annotations

import threading
import time
from datetime import UTC, datetime
from pathlib import Path

from mlflow import MlflowClient
from mlflow.entities import Metric, Run, RunTag, ViewType
from mlflow.exceptions import MlflowException

SEQ_METRIC = "seq"
RECORD_TAG = "evergreen.record"
RECORDS_SUFFIX = "-records"
_PAGE = 1000
_REMOTE_SCHEMES = ("http://", "https://", "databricks")


def default_artifact_location(tracking_uri: str) -> str | None:
    """Where a client-side store keeps artifacts when none is configured.

    SQLite stores get `mlartifacts/` beside the database file (never MLflow's `./mlruns`
    relative to whatever the current directory is); servers decide for themselves (None).
    """
    prefix = "sqlite:///"
    if tracking_uri.startswith(prefix):
        return (Path(tracking_uri[len(prefix) :]).resolve().parent / "mlartifacts").as_uri()
    return None


def is_remote(tracking_uri: str) -> bool:
    """True for tracking servers (they choose artifact locations), False for client-side stores."""
    return tracking_uri.startswith(_REMOTE_SCHEMES)


def now_iso() -> str:
    """UTC timestamp with microseconds, e.g. 2026-11-21T04:00:00.123456+00:00."""
    return datetime.now(UTC).isoformat()


def quote(value: str) -> str:
    """A value for an MLflow filter string, single-quoted.

    Raises:
        ValueError: the value contains a quote (MLflow filter strings cannot escape it).
    """
    if "'" in value or '"' in value:
        raise ValueError(f"{value!r}: quotes are not allowed in names used for searching")
    return f"'{value}'"


class RunLog:
    """An append-only log of small records of one `kind`, each a finished, tags-only MLflow run.

    Several kinds share an experiment (each record carries `evergreen.record = kind`); `legacy`
    experiments hold records of this kind from before the sharing (no kind tag) and are read too.
    """

    _last_seq = 0
    _seq_lock = threading.Lock()

    def __init__(
        self,
        client: MlflowClient,
        experiment: str,
        artifact_location: str | None,
        *,
        kind: str | None = None,
        legacy: tuple[str, ...] = (),
    ) -> None:
        self.client = client
        self.experiment = experiment
        self.artifact_location = artifact_location
        self.kind = kind
        self.legacy = legacy
        self._experiment_id: str | None = None

    def experiment_id(self, *, create: bool = True) -> str | None:
        """The log's experiment id; created (or restored) on first write, None before that."""
        if self._experiment_id is None:
            if create:
                self._experiment_id = ensure_experiment(
                    self.client, self.experiment, self.artifact_location
                )
            else:
                found = self.client.get_experiment_by_name(self.experiment)
                return found.experiment_id if found else None
        return self._experiment_id

    def append(self, tags: dict[str, str], *, run_name: str, after: int = 0) -> str:
        """Write one record and return its run id.

        Its `seq` is now in µs, strictly above `after` and above every seq this process issued.
        """
        seq = self.next_seq(after)
        run = self.client.create_run(str(self.experiment_id()), run_name=run_name)
        stamp = int(time.time() * 1000)
        kind = {RECORD_TAG: self.kind} if self.kind else {}
        self.client.log_batch(
            run.info.run_id,
            metrics=[Metric(SEQ_METRIC, float(seq), stamp, 0)],
            tags=[RunTag(k, str(v)) for k, v in {**tags, **kind}.items()],
        )
        # update_run, not set_terminated: that one prints "View run …" to stdout on servers.
        self.client.update_run(run.info.run_id, status="FINISHED")
        run_id: str = run.info.run_id
        return run_id

    @classmethod
    def next_seq(cls, floor: int) -> int:
        """Microseconds since the epoch, above `floor` and above every seq this process issued."""
        with cls._seq_lock:
            cls._last_seq = max(time.time_ns() // 1000, floor + 1, cls._last_seq + 1)
            return cls._last_seq

    def search(self, filter_string: str, limit: int | None = None) -> list[Run]:
        """Records matching `filter_string`, newest (highest seq) first; all when limit=None."""
        runs = self._search_in(self.experiment_id(create=False), self._scoped(filter_string), limit)
        for name in self.legacy:  # reading never creates anything
            found = self.client.get_experiment_by_name(name)
            if found is not None and found.lifecycle_stage == "active":
                runs += self._search_in(found.experiment_id, filter_string, limit)
        if self.legacy:
            runs.sort(key=lambda r: (run_seq(r), r.info.start_time), reverse=True)
        return runs if limit is None else runs[:limit]

    def _scoped(self, filter_string: str) -> str:
        if not self.kind:
            return filter_string
        scope = f"tags.`{RECORD_TAG}` = {quote(self.kind)}"
        return f"{scope} and {filter_string}" if filter_string else scope

    def _search_in(
        self, experiment_id: str | None, filter_string: str, limit: int | None
    ) -> list[Run]:
        runs: list[Run] = []
        token = None
        while experiment_id is not None:
            want = _PAGE if limit is None else min(_PAGE, limit - len(runs))
            if want <= 0:
                break
            page = self.client.search_runs(
                [experiment_id],
                filter_string=filter_string,
                run_view_type=ViewType.ACTIVE_ONLY,
                max_results=want,
                order_by=[f"metrics.{SEQ_METRIC} DESC", "attributes.start_time DESC"],
                page_token=token,
            )
            runs.extend(page)
            token = page.token
            if not token:
                break
        return runs


def records_experiment(experiment: str) -> str:
    """The one bookkeeping experiment beside the training runs' `experiment`."""
    return f"{experiment}{RECORDS_SUFFIX}"


def run_seq(run: Run) -> int:
    """The ordering key of a record written by `RunLog.append`."""
    return int(run.data.metrics.get(SEQ_METRIC, 0))


def ensure_experiment(client: MlflowClient, name: str, artifact_location: str | None) -> str:
    """Get or create experiment `name` (restoring it if deleted); safe against a racing creator."""
    experiment = client.get_experiment_by_name(name)
    if experiment is None:
        try:
            return client.create_experiment(name, artifact_location=artifact_location)
        except MlflowException as exc:  # another process created it first
            experiment = client.get_experiment_by_name(name)
            if experiment is None:
                raise exc from None
    if experiment.lifecycle_stage == "deleted":
        client.restore_experiment(experiment.experiment_id)
    return experiment.experiment_id
