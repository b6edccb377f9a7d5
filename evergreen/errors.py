"""What the CLI tells a person when a command fails: one actionable line and an exit code per class.

A traceback is for the developer of evergreen; the operator running `evergreen status` at 3 a.m.
needs to know which of a handful of things went wrong and what to do about it. `classify` maps an
exception (walking its `__cause__`/`__context__` chain, since MLflow and Prefect wrap the
connection errors they meet) to one `Failure`; `--debug` (or EVERGREEN_DEBUG=1) shows the traceback
as well. The table is documented in the README's CLI reference; keep the two in step.
"""

from __future__ import annotations

import errno
import re
from collections.abc import Iterator
from dataclasses import dataclass
from enum import IntEnum
from urllib.parse import urlsplit


class ExitCode(IntEnum):
    """The `evergreen` exit codes, one per class of failure."""

    OK = 0
    FLOW_FAILED = 1  # the command ran; its flow reported a failed or refused outcome
    USAGE = 2  # bad flags or flow parameters (argparse uses 2 as well)
    CONFIG = 3  # config file missing, unreadable or invalid
    NO_CHAMPION = 4  # the command needs a champion and there is none yet
    REGISTRY = 5  # the MLflow registry refused the operation (integrity, stale alias, …)
    CONNECTION = 6  # MLflow tracking server, S3 endpoint or Prefect API unreachable
    DATA = 7  # a landing-zone batch cannot be read
    STORAGE = 8  # state cannot be written: disk full, quota, permission denied, read-only
    INTERNAL = 70  # anything else: a bug (EX_SOFTWARE); rerun with --debug and report it
    INTERRUPTED = 130  # Ctrl-C


class EvergreenError(Exception):
    """An error the CLI reports as one line with its own exit code."""

    code = ExitCode.INTERNAL


class UsageError(EvergreenError, ValueError):
    """Bad flags or flow parameters."""

    code = ExitCode.USAGE


class ConfigError(EvergreenError, ValueError):
    """The config file is missing, unreadable or invalid."""

    code = ExitCode.CONFIG


@dataclass(frozen=True)
class Failure:
    code: ExitCode
    message: str


def _chain(error: BaseException) -> Iterator[BaseException]:
    """`error` and every exception it was raised from or while handling (no cycles)."""
    seen: set[int] = set()
    current: BaseException | None = error
    while current is not None and id(current) not in seen:
        seen.add(id(current))
        yield current
        current = current.__cause__ or current.__context__


def _is_connection_error(error: BaseException) -> bool:
    names = {cls.__module__.split(".")[0] + "." + cls.__name__ for cls in type(error).__mro__}
    return bool(
        isinstance(error, ConnectionError)  # builtin: refused, reset, aborted
        or names
        & {
            "requests.ConnectionError",  # MLflow's REST client
            "urllib3.NewConnectionError",
            "botocore.EndpointConnectionError",  # S3 endpoint down
            "botocore.ConnectTimeoutError",
            "botocore.NoCredentialsError",
            "httpx.ConnectError",  # Prefect API
            "httpx.ConnectTimeout",
        }
    )


def _connection_message(error: BaseException) -> str:
    name = type(error).__name__
    if name == "NoCredentialsError":
        return (
            "no S3 credentials found: set AWS_ACCESS_KEY_ID/AWS_SECRET_ACCESS_KEY (or AWS_PROFILE), "
            "and AWS_ENDPOINT_URL for a non-AWS endpoint"
        )
    if type(error).__module__.startswith("botocore"):
        return (
            f"cannot reach the S3 endpoint {_s3_endpoint(error)} (gave up after its retries): "
            "check that it is running, AWS_ENDPOINT_URL_S3/AWS_ENDPOINT_URL and the network; "
            "AWS_MAX_ATTEMPTS sets the attempts per request"
        )
    if type(error).__module__.startswith("httpx"):
        return (
            f"cannot reach the Prefect API ({error}): start `prefect server start` or unset "
            "PREFECT_API_URL to run ephemeral"
        )
    return (
        "cannot reach the MLflow tracking server: check registry.tracking_uri / "
        f"MLFLOW_TRACKING_URI and that the server is running ({_root_reason(error)})"
    )


# errno values that mean "this machine cannot store what evergreen writes", not a bug
_STORAGE_ERRNOS = {
    errno.ENOSPC: "no space left on the device",
    errno.EDQUOT: "disk quota exceeded",
    errno.EFBIG: "file too large (disk full or a file-size limit)",
    errno.EACCES: "permission denied",
    errno.EPERM: "operation not permitted",
    errno.EROFS: "read-only file system",
}
_RUST_OS_ERROR = re.compile(r"\(os error (\d+)\)")
# what SQLite (the MLflow store, Prefect's database) says for the same faults, through
# SQLAlchemy and MLflow, which wrap it in their own exceptions and sometimes only in text
_SQLITE_STORAGE = {
    "database or disk is full": "the SQLite database's disk is full",
    "attempt to write a readonly database": "the SQLite database is read-only for this user",
    "disk i/o error": "SQLite could not write its database (disk full or failing)",
}


def _storage_reason(error: BaseException) -> str | None:
    """Why state could not be written, if `error` is a disk-full or permission fault."""
    if isinstance(error, OSError) and error.errno in _STORAGE_ERRNOS:
        where = f" {error.filename}" if error.filename else ""
        return f"{_STORAGE_ERRNOS[error.errno]}{where}"
    text = str(error).lower()
    rust = _RUST_OS_ERROR.search(text)  # safetensors (Rust) reports "I/O error: … (os error 28)"
    if rust and int(rust.group(1)) in _STORAGE_ERRNOS:
        return _STORAGE_ERRNOS[int(rust.group(1))]
    for phrase, reason in _SQLITE_STORAGE.items():
        if phrase in text:
            return reason
    return None


def _storage_message(reason: str) -> str:
    return (
        f"storage: {reason}. Free disk space or fix the permissions of the evergreen home and "
        "the MLflow store, then rerun (state is written to a temporary name and renamed, so "
        "what was written before is intact)"
    )


def _s3_endpoint(error: BaseException) -> str:
    """`scheme://host:port` of the request botocore could not send (its URL's bucket, key and
    query are noise on the one line an operator reads)."""
    url = str(getattr(error, "kwargs", {}).get("endpoint_url") or "")
    if not url:
        return "(no URL in the error)"
    parts = urlsplit(url)
    return f"{parts.scheme}://{parts.netloc}" if parts.netloc else url


def _root_reason(error: BaseException) -> str:
    """The innermost reason of a connection error ("[Errno 111] Connection refused")."""
    text = str(error)
    for marker in ("Failed to establish a new connection: ", "Caused by "):
        if marker in text:
            text = text.split(marker, 1)[1]
    return _first_line(text.strip(" ()\"'"), limit=160) if text else type(error).__name__


def _first_line(error: BaseException | str, limit: int = 300) -> str:
    text = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _by_type(error: BaseException) -> Failure | None:
    """The class of one exception in the chain, or None when it says nothing specific."""
    name = type(error).__name__
    module = type(error).__module__
    if isinstance(error, EvergreenError):
        return Failure(error.code, _first_line(error))
    if name == "NoChampionError" or (name == "RegistryError" and "has no champion" in str(error)):
        return Failure(ExitCode.NO_CHAMPION, _first_line(error))
    if _is_connection_error(error):
        return Failure(ExitCode.CONNECTION, _connection_message(error))
    if name == "NoEarlierChampionError":  # `evergreen rollback` that did not roll back
        return Failure(ExitCode.FLOW_FAILED, f"rollback: {_first_line(error)}")
    if name == "UnknownVersionError":  # `rollback --to` a version that does not exist
        return Failure(ExitCode.USAGE, _first_line(error))
    if name in {
        "RegistryError",
        "StaleChampionError",
        "ArtifactIntegrityError",
        "LockTimeoutError",
    }:
        return Failure(ExitCode.REGISTRY, f"registry: {_first_line(error)}")
    if name in {"CheckpointError", "MemoryIntegrityError", "StaleMemoryError"}:
        return Failure(ExitCode.REGISTRY, f"registry: {_first_line(error)}")
    if module.startswith("mlflow") and name in {"MlflowException", "RestException"}:
        return Failure(ExitCode.REGISTRY, f"MLflow: {_first_line(error)}")
    if name == "ModelPathError":  # continual.base_model: hf_path names no local model
        return Failure(ExitCode.CONFIG, f"model.hf_path: {_first_line(error)}")
    if name == "LoraTargetError":  # continual.lora: daily.target_modules names no module
        return Failure(ExitCode.CONFIG, f"daily.target_modules: {_first_line(error)}")
    if name == "BatchReadError":
        return Failure(ExitCode.DATA, _first_line(error))
    if name == "LandingZoneNotFound":
        return Failure(ExitCode.CONFIG, _first_line(error))
    return None


def classify(error: BaseException) -> Failure:
    """One line and an exit code for `error` (see `ExitCode`)."""
    if isinstance(error, KeyboardInterrupt):
        return Failure(ExitCode.INTERRUPTED, "interrupted")
    chain = list(_chain(error))
    # A connection error anywhere in the chain explains the wrapper around it.
    for link in chain:
        if _is_connection_error(link):
            return Failure(ExitCode.CONNECTION, _connection_message(link))
    # So does a full disk or a denied write (MLflow reports SQLite's as a registry error);
    # a landing-zone file that cannot be read stays a data error.
    unreadable_batch = any(type(link).__name__ == "BatchReadError" for link in chain)
    for link in [] if unreadable_batch else chain:
        reason = _storage_reason(link)
        if reason is not None:
            return Failure(ExitCode.STORAGE, _storage_message(reason))
    for link in chain:
        failure = _by_type(link)
        if failure is not None:
            return failure
    if type(error).__name__ == "ValidationError":  # flow parameters (pydantic)
        return Failure(ExitCode.USAGE, _validation_line(error))
    return Failure(
        ExitCode.INTERNAL,
        f"unexpected {type(error).__name__}: {_first_line(error)} "
        "(rerun with --debug for the traceback and report it)",
    )


def _validation_line(error: BaseException) -> str:
    """A pydantic ValidationError in one line: `field: message; …`."""
    errors = getattr(error, "errors", None)
    if not callable(errors):
        return _first_line(error)
    parts = [
        f"{'.'.join(str(p) for p in item.get('loc', ())) or 'value'}: {item.get('msg', '')}"
        for item in errors()
    ]
    return "invalid " + "; ".join(parts)
