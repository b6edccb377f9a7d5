"""The batch ledger and the RunLog under it, on an embedded SQLite MLflow store."""

from __future__ import annotations

import threading

import pytest

from model_registry.ledger import Ledger
from model_registry.locking import LockTimeoutError, lock_path, promotion_lock
from model_registry.run_log import RunLog, default_artifact_location, is_remote


@pytest.fixture(scope="module")
def uri(tmp_path_factory: pytest.TempPathFactory) -> str:
    return f"sqlite:///{tmp_path_factory.mktemp('ledger')}/mlflow.db"


@pytest.fixture
def ledger(uri: str, request: pytest.FixtureRequest) -> Ledger:
    return Ledger(uri, experiment=f"ledger-{request.node.name}")


def test_record_twice_latest_wins_and_failed_does_not_count(ledger):
    ledger.record("daily", "2026-11-20", "failed", details={"error": "OOM"})
    assert not ledger.is_processed("daily", "2026-11-20")  # a failed run is retried
    ledger.record("daily", "2026-11-20", "promoted", details={"version": "3"}, run_id="r1")
    ledger.record("daily", "2026-11-20", "promoted", details={"version": "3"}, run_id="r1")
    assert ledger.is_processed("daily", "2026-11-20")
    assert not ledger.is_processed("weekly", "2026-11-20")  # per cadence
    assert not ledger.is_processed("daily", "2026-11-21")
    latest = ledger.processed("daily")
    assert list(latest) == ["2026-11-20"]
    assert (latest["2026-11-20"].outcome, latest["2026-11-20"].run_id) == ("promoted", "r1")
    assert latest["2026-11-20"].details == {"version": "3"}
    assert [e.outcome for e in ledger.entries("daily")] == ["promoted", "promoted", "failed"]


@pytest.mark.parametrize(
    ("outcome", "done"),
    [
        ("promoted", True),
        ("rejected", True),
        ("quarantined", True),
        ("failed", False),
        ("skipped", False),
    ],
)
def test_which_outcomes_count_as_processed(ledger, outcome, done):
    ledger.record("weekly", "b1", outcome)
    assert ledger.is_processed("weekly", "b1") is done


def test_a_quarantine_is_found_only_on_the_same_fingerprint(ledger):
    ledger.record("daily", "b1", "quarantined", details={"reason": "NaN", "fingerprint": "f1"})
    ledger.record("daily", "b2", "quarantined", details={"reason": "NaN", "fingerprint": "f2"})
    found = ledger.earlier_quarantine("b1", "f1")
    assert found is not None and (found.cadence, found.details["reason"]) == ("daily", "NaN")
    assert ledger.earlier_quarantine("b1", "f2") is None  # fixed in place
    assert ledger.earlier_quarantine("b3", "f1") is None
    ledger.record("monthly", "b4", "promoted", details={"fingerprint": "f4"})
    assert ledger.earlier_quarantine("b4", "f4") is None  # only quarantines count


def test_a_quarantined_batch_whose_files_changed_is_taken_again(ledger):
    """Fixing an export in place is enough: the next run of the cadence re-validates it."""
    ledger.record("daily", "b1", "quarantined", details={"fingerprint": "f1", "listing": "L1"})
    ledger.record("daily", "b2", "quarantined", details={"fingerprint": "f2", "listing": "L2"})
    ledger.record("daily", "b3", "quarantined", details={"fingerprint": "f3"})  # older release
    ledger.record("weekly", "b4", "quarantined", details={"fingerprint": "f4", "listing": "L4"})
    now = {"b1": "L1", "b2": "L2-fixed", "b3": "L3", "b4": "L4-fixed"}
    assert ledger.changed_quarantines("daily", now) == {"b2"}  # b4: not daily's quarantine
    assert ledger.changed_quarantines("weekly", now) == {"b4"}
    ledger.record(
        "daily", "b2", "quarantined", details={"fingerprint": "f2", "listing": "L2-fixed"}
    )
    assert ledger.changed_quarantines("daily", now) == set()  # re-validated: still broken
    assert ledger.changed_quarantines("daily", {}) == set()


def test_a_clean_batch_is_not_fingerprinted_for_the_look_up(ledger):
    calls = []

    def fingerprint() -> str:
        calls.append(1)
        return "f1"

    ledger.record("daily", "b1", "promoted")
    assert ledger.earlier_quarantine("b1", fingerprint) is None
    assert calls == []  # nobody quarantined b1: nothing to compare with
    ledger.record("daily", "b2", "quarantined", details={"reason": "NaN", "fingerprint": "f1"})
    assert ledger.earlier_quarantine("b2", fingerprint) is not None
    assert calls == [1]


def test_entries_are_newest_first_filtered_and_limited(ledger):
    for i in range(6):  # written faster than MLflow's millisecond timestamps can order them
        ledger.record("daily" if i % 2 else "monthly", f"b{i}", "rejected")
    assert [e.batch_id for e in ledger.entries()] == ["b5", "b4", "b3", "b2", "b1", "b0"]
    assert [e.batch_id for e in ledger.entries("daily", limit=2)] == ["b5", "b3"]
    assert set(ledger.processed("monthly")) == {"b0", "b2", "b4"}
    assert all(e.at.endswith("+00:00") for e in ledger.entries())


def test_ledger_survives_a_new_instance(ledger, uri):
    ledger.record("daily", "2026-11-21", "quarantined", details={"file": "a.csv"})
    reopened = Ledger(uri, experiment=ledger.log.experiment)
    assert reopened.is_processed("daily", "2026-11-21")
    assert reopened.entries()[0].details == {"file": "a.csv"}


def test_bad_input_is_refused(ledger):
    with pytest.raises(ValueError, match="'done' is not one of"):
        ledger.record("daily", "b", "done")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="quotes"):
        ledger.record("daily", "it's", "promoted")
    assert ledger.entries() == [] and ledger.processed("daily") == {}
    assert ledger.log.client.get_experiment_by_name(ledger.log.experiment) is None  # reads: no-op


def test_seq_is_strictly_increasing_across_threads(monkeypatch):
    # the counter is process-wide: restore it, or every later record gets a seq near 1e17,
    # beyond what a float metric stores exactly
    monkeypatch.setattr(RunLog, "_last_seq", RunLog._last_seq)
    seen: list[int] = []

    def grab() -> None:
        seen.extend(RunLog.next_seq(0) for _ in range(200))

    threads = [threading.Thread(target=grab) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(seen)) == 800
    assert RunLog.next_seq(10**17) == 10**17 + 1  # never below a given floor


def test_artifact_location_defaults():
    location = default_artifact_location("sqlite:////srv/evergreen/mlflow.db")
    assert location == "file:///srv/evergreen/mlartifacts"
    assert default_artifact_location("http://127.0.0.1:5000") is None
    assert is_remote("https://mlflow.example.com") and not is_remote("sqlite:///x.db")


def test_promotion_lock_excludes_others_and_times_out(tmp_path):
    path = lock_path("my model/v1", tmp_path)
    assert path == tmp_path / "my_model_v1.lock"
    with promotion_lock("my model/v1", tmp_path):
        errors: list[BaseException] = []

        def contender() -> None:
            try:
                with promotion_lock("my model/v1", tmp_path, timeout=0.3):
                    pass
            except LockTimeoutError as exc:
                errors.append(exc)

        thread = threading.Thread(target=contender)
        thread.start()
        thread.join()
        assert len(errors) == 1 and str(path) in str(errors[0])
    with promotion_lock("my model/v1", tmp_path, timeout=0.3):  # released on exit
        pass


def _counting(monkeypatch: pytest.MonkeyPatch, ledger: Ledger) -> list[int]:
    """Count the records every MLflow search of `ledger` returns (its client is shared)."""
    read: list[int] = []
    search = ledger.log.client.search_runs

    def counted(*args, **kwargs):
        page = search(*args, **kwargs)
        read.append(len(page))
        return page

    monkeypatch.setattr(ledger.log.client, "search_runs", counted)
    return read


def _write(ledger: Ledger, cadence: str, batches: range, outcome: str = "promoted") -> None:
    for i in batches:
        ledger.record(cadence, f"b{i:03d}", outcome)  # type: ignore[arg-type]
        ledger.compact(cadence)  # what tasks.ledger.record does after each run's entries


def test_latest_outcomes_reads_a_bounded_number_of_records(uri, monkeypatch):
    ledger = Ledger(uri, experiment="ledger-growth", settle_seconds=0, compact_after=4)
    read = _counting(monkeypatch, ledger)
    cost = {}
    for upto in (8, 32):
        _write(ledger, "daily", range(len(ledger.processed("daily")), upto))
        read.clear()
        latest = ledger.latest_outcomes("daily")
        cost[upto] = (sum(read), len(read))
        assert latest == {b: e.outcome for b, e in ledger.processed("daily").items()}
        assert len(latest) == upto
    # one summary plus fewer than compact_after records after it, in two searches, at 8 or 32
    assert cost[8] == cost[32]
    assert cost[32][0] <= 1 + 4 and cost[32][1] == 2


def test_summaries_keep_failed_batches_pending_and_forced_reruns_done(uri):
    ledger = Ledger(uri, experiment="ledger-summary-semantics", settle_seconds=0, compact_after=2)
    _write(ledger, "daily", range(3))
    ledger.record("daily", "b001", "failed", details={"error": "OOM"})  # after the summary
    ledger.record("daily", "b002", "failed")
    assert ledger.compact("daily")  # the failures are now inside a summary
    ledger.record("daily", "b002", "promoted", details={"forced": "true"})  # rerun succeeded
    latest = ledger.latest_outcomes("daily")
    assert latest == {"b000": "promoted", "b001": "failed", "b002": "promoted"}
    assert latest == {b: e.outcome for b, e in ledger.processed("daily").items()}
    assert ledger.latest_outcomes("weekly") == {}  # per cadence


def test_unsettled_records_are_not_folded(uri):
    ledger = Ledger(uri, experiment="ledger-unsettled", settle_seconds=3600, compact_after=1)
    _write(ledger, "daily", range(3))
    assert not ledger.compact("daily")  # a late write with an older seq could still arrive
    assert set(ledger.latest_outcomes("daily")) == {"b000", "b001", "b002"}
