"""The landing zone: where labelled batches arrive, as `<uri>/<batch_id>/<file>`.

A batch is a folder (local) or a key prefix (S3) holding Parquet, CSV or JSON Lines files. Batch
ids sort in arrival order (`2026-11-21`, `2026-11-21T04-00`). The landing zone is read-only for
the pipeline: nothing here modifies or deletes a file; invalid batches are quarantined by the
caller (recorded, never deleted). `write_bytes`/`write_frame` exist for the demo and tests.

Reading streams each file in chunks (bounded memory per file) and turns every problem a person
must fix upstream (empty, truncated, non-UTF-8, unparseable, mixed schemas) into a
`BatchReadError` naming the file and what was expected. Missing columns are left to validation.
"""

from __future__ import annotations

import io
import logging
import os
import re
import shutil
import tempfile
from abc import ABC, abstractmethod
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import pandas as pd

from data_plane import readers
from data_plane.profile import canonical_labels

if TYPE_CHECKING:
    from evergreen.config import DataConfig

log = logging.getLogger(__name__)

SUPPORTED_SUFFIXES = (".parquet", ".csv", ".jsonl", ".json")
_FORMATS = {"parquet": ".parquet", "csv": ".csv", "jsonl": ".jsonl"}
_SAFE_NAME = re.compile(r"^[A-Za-z0-9_][A-Za-z0-9._:=+-]*$")

BatchReadError = readers.BatchReadError
SOURCE_COLUMN = readers.SOURCE_COLUMN
FileRef = readers.FileRef


COLUMNS_IN_FILES_ATTR = "columns_in_files"


@dataclass(frozen=True)
class ObjectInfo:
    """One object of a batch as the landing-zone listing saw it (any file, hidden ones too)."""

    name: str
    size: int
    modified: float  # seconds since the epoch


def data_columns(data_cfg: DataConfig) -> list[str]:
    """The columns a batch must provide: features (or the text column), then the label.

    These identify a row for hashing and splitting, and are what `read_batch` reads.
    """
    return [*data_cfg.features, *([data_cfg.text] if data_cfg.text else []), data_cfg.label]


def file_columns(data_cfg: DataConfig) -> list[str]:
    """The columns the files must hold: `data_columns` without the label of text-only data
    (a causal LM), which `read_batch` fills in as the one placeholder class."""
    columns = data_columns(data_cfg)
    return columns[:-1] if data_cfg.text_only else columns


def _is_data_file(name: str, where: str) -> bool:
    """Hidden/underscore files (`.tmp`, `_SUCCESS`) and other formats are not data."""
    if not name or name.startswith((".", "_")):
        return False
    if not name.lower().endswith(SUPPORTED_SUFFIXES):
        log.info("ignoring %s/%s: not one of %s", where, name, ", ".join(SUPPORTED_SUFFIXES))
        return False
    return True


def _regular(path: Path) -> bool:
    """A regular file that is not a symlink: a link could point outside the landing zone."""
    if path.is_symlink():
        log.warning("ignoring %s: symbolic links are not followed in the landing zone", path)
        return False
    return path.is_file()


MAX_NAME_LENGTH = 200


def unsafe_name(value: str) -> str | None:
    """Why a batch id or file name cannot be used as a path component, or None if it can.

    Only ASCII letters, digits and `. _ - : = +`, not starting with `.`/`-`, no `..`, at most
    200 characters: such a name cannot escape the landing zone (or `home`, where reports are
    named after batches), hide characters (bidi overrides, look-alike digits, newlines) or
    overflow a file-system name.
    """
    if len(value) > MAX_NAME_LENGTH:
        return f"longer than {MAX_NAME_LENGTH} characters"
    if not _SAFE_NAME.fullmatch(value) or ".." in value:
        return "use only ASCII letters, digits and . _ - : = + (no '..', no leading '.' or '-')"
    return None


def _check_part(kind: str, value: str) -> None:
    if unsafe_name(value):
        raise ValueError(
            f"{kind} {value!r} is not a safe path component: use letters, digits and . _ - : = +"
        )


class LandingZone(ABC):
    """Where batches arrive; `uri` is a local folder or `s3://bucket/prefix`."""

    uri: str

    @abstractmethod
    def list_batches(self) -> list[str]:
        """Batch ids, sorted (see the subclass for which folders count)."""

    @abstractmethod
    def list_files(self, batch_id: str) -> list[FileRef]:
        """Data files of a batch, sorted by name; other files are ignored (and logged)."""

    @abstractmethod
    def has_files(self, batch_id: str) -> bool:
        """Whether the batch holds any non-hidden file (data or not): has it arrived?"""

    @abstractmethod
    def scan(self) -> dict[str, list[ObjectInfo]]:
        """Every batch folder and its files, from one listing of the whole landing zone.

        Hidden/underscore folders are left out; files are every regular file directly in the
        folder (hidden temp files and markers included: they tell whether an upload is going on).
        """

    @abstractmethod
    def read_bytes(self, batch_id: str, name: str) -> bytes:
        """The whole content of `<batch_id>/<name>` (markers, manifests, checksums)."""

    @abstractmethod
    def open(self, ref: FileRef) -> BinaryIO:
        """A streaming binary handle on the file (the caller closes it)."""

    @abstractmethod
    def write_bytes(self, batch_id: str, name: str, data: bytes) -> None:
        """Create or replace `<batch_id>/<name>` (demo and tests; never used by the pipeline)."""

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.uri!r})"


class LandingZoneNotFound(FileNotFoundError):
    """`data.landing` names a folder or bucket that does not exist: a configuration fault (the
    CLI exits with its config code), not a bug and not an unreadable batch."""


class LocalLandingZone(LandingZone):
    """A landing zone on the local file system."""

    def __init__(self, uri: str | os.PathLike[str]) -> None:
        self.uri = str(uri)
        self.root = Path(uri).expanduser()

    def _require_root(self) -> None:
        if not self.root.is_dir():
            raise LandingZoneNotFound(
                f"landing zone {self.root} does not exist: create it or fix `data.landing`"
            )

    def list_batches(self) -> list[str]:
        """Sub-folders that hold at least one non-hidden file."""
        self._require_root()
        return sorted(
            p.name
            for p in self.root.iterdir()
            if not p.name.startswith((".", "_")) and self.has_files(p.name)
        )

    def has_files(self, batch_id: str) -> bool:
        folder = self._folder(batch_id)
        return folder is not None and any(
            _regular(p) and not p.name.startswith((".", "_")) for p in folder.iterdir()
        )

    def _folder(self, batch_id: str) -> Path | None:
        """The batch's folder if it is a real directory directly under the root (no symlink,
        no `..`, no path separator: a batch id from anywhere cannot escape the landing zone)."""
        if unsafe_name(batch_id):
            return None
        folder = self.root / batch_id
        return folder if folder.is_dir() and not folder.is_symlink() else None

    def scan(self) -> dict[str, list[ObjectInfo]]:
        self._require_root()
        batches: dict[str, list[ObjectInfo]] = {}
        for folder in sorted(self.root.iterdir()):
            if folder.name.startswith((".", "_")) or not folder.is_dir():
                continue
            if folder.is_symlink():
                log.warning("ignoring %s: symbolic links are not followed", folder)
                continue
            objects = []
            for path in sorted(folder.iterdir()):
                if _regular(path):
                    stat = path.stat()
                    objects.append(ObjectInfo(path.name, stat.st_size, stat.st_mtime))
            batches[folder.name] = objects
        return batches

    def read_bytes(self, batch_id: str, name: str) -> bytes:
        folder = self._folder(batch_id)
        path = folder / name if folder is not None else None
        if path is None or "/" in name or not _regular(path):
            raise FileNotFoundError(f"{self.root / batch_id / name} is not a file of the batch")
        return path.read_bytes()

    def list_files(self, batch_id: str) -> list[FileRef]:
        folder = self._folder(batch_id)
        if folder is None:
            return []
        paths = sorted(p for p in folder.iterdir() if _regular(p))
        return [
            FileRef(batch_id, p.name, p.stat().st_size, str(p))
            for p in paths
            if _is_data_file(p.name, str(folder))
        ]

    def open(self, ref: FileRef) -> BinaryIO:
        return open(ref.uri, "rb")  # the caller owns (closes) the handle

    def write_bytes(self, batch_id: str, name: str, data: bytes) -> None:
        """Atomic: written to a hidden temp file (never listed), then renamed."""
        _check_part("batch_id", batch_id)
        _check_part("file name", name)
        folder = self.root / batch_id
        folder.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=folder, prefix=".tmp-")
        try:
            with os.fdopen(fd, "wb") as handle:
                handle.write(data)
            os.replace(tmp, folder / name)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise


class S3LandingZone(LandingZone):
    """A landing zone under `s3://bucket/prefix` (any S3-compatible endpoint).

    Batches are the common prefixes one level below `prefix` (ListObjectsV2 with Delimiter="/",
    paginated). S3 cannot tell a prefix that holds only a zero-byte "folder" marker from a real
    batch without one extra request per prefix, so `list_batches` may list such a prefix;
    `arrival.pending_batches` drops it until files arrive.
    """

    def __init__(self, uri: str, client: Any) -> None:
        if not uri.startswith("s3://"):
            raise ValueError(f"not an S3 URI: {uri!r} (expected s3://bucket/prefix)")
        bucket, _, prefix = uri[len("s3://") :].partition("/")
        if not bucket:
            raise ValueError(f"S3 URI {uri!r} has no bucket (expected s3://bucket/prefix)")
        self.uri = uri
        self.bucket = bucket
        self.prefix = prefix.strip("/") + "/" if prefix.strip("/") else ""
        self.client = client

    def _pages(self, prefix: str) -> Iterator[dict[str, Any]]:
        paginator = self.client.get_paginator("list_objects_v2")
        try:
            yield from paginator.paginate(Bucket=self.bucket, Prefix=prefix, Delimiter="/")
        except self.client.exceptions.NoSuchBucket as exc:
            raise LandingZoneNotFound(
                f"landing zone {self.uri}: bucket {self.bucket!r} does not exist"
                " — create it or fix `data.landing`"
            ) from exc

    def list_batches(self) -> list[str]:
        batches = [
            common["Prefix"][len(self.prefix) :].rstrip("/")
            for page in self._pages(self.prefix)
            for common in page.get("CommonPrefixes", [])
        ]
        return sorted(b for b in batches if b and not b.startswith((".", "_")))

    def _objects(self, batch_id: str) -> Iterator[tuple[str, int]]:
        problem = unsafe_name(batch_id)
        if problem:
            raise ValueError(f"batch id {batch_id!r} is not a safe name: {problem}")
        base = f"{self.prefix}{batch_id}/"
        for page in self._pages(base):
            for obj in page.get("Contents", []):
                yield obj["Key"][len(base) :], int(obj["Size"])

    def has_files(self, batch_id: str) -> bool:
        return any(name and not name.startswith((".", "_")) for name, _ in self._objects(batch_id))

    def scan(self) -> dict[str, list[ObjectInfo]]:
        """One paginated listing of every key under the prefix (no per-batch requests)."""
        paginator = self.client.get_paginator("list_objects_v2")
        batches: dict[str, list[ObjectInfo]] = {}
        try:
            for page in paginator.paginate(Bucket=self.bucket, Prefix=self.prefix):
                for obj in page.get("Contents", []):
                    batch_id, _, name = obj["Key"][len(self.prefix) :].partition("/")
                    if not batch_id or batch_id.startswith((".", "_")):
                        continue
                    objects = batches.setdefault(batch_id, [])
                    if name and "/" not in name:  # direct children only, as `list_files`
                        modified = obj["LastModified"].timestamp()
                        objects.append(ObjectInfo(name, int(obj["Size"]), modified))
        except self.client.exceptions.NoSuchBucket as exc:
            raise LandingZoneNotFound(
                f"landing zone {self.uri}: bucket {self.bucket!r} does not exist"
                " — create it or fix `data.landing`"
            ) from exc
        return dict(sorted(batches.items()))

    def read_bytes(self, batch_id: str, name: str) -> bytes:
        problem = unsafe_name(batch_id) or ("a path separator" if "/" in name else None)
        if problem:
            raise ValueError(f"{batch_id}/{name} is not readable from the landing zone: {problem}")
        key = f"{self.prefix}{batch_id}/{name}"
        data: bytes = self.client.get_object(Bucket=self.bucket, Key=key)["Body"].read()
        return data

    def list_files(self, batch_id: str) -> list[FileRef]:
        where = f"{self.uri.rstrip('/')}/{batch_id}"
        return [
            FileRef(batch_id, name, size, f"s3://{self.bucket}/{self.prefix}{batch_id}/{name}")
            for name, size in sorted(self._objects(batch_id))
            if _is_data_file(name, where)
        ]

    def open(self, ref: FileRef) -> BinaryIO:
        key = ref.uri[len(f"s3://{self.bucket}/") :]
        body: BinaryIO = self.client.get_object(Bucket=self.bucket, Key=key)["Body"]
        return body

    def write_bytes(self, batch_id: str, name: str, data: bytes) -> None:
        _check_part("batch_id", batch_id)
        _check_part("file name", name)
        key = f"{self.prefix}{batch_id}/{name}"
        self.client.put_object(Bucket=self.bucket, Key=key, Body=data)


def make_s3_client(*, endpoint_url: str | None = None) -> Any:
    """A boto3 S3 client that retries throttling, 5xx and an unreachable endpoint with backoff.

    Credentials, region and endpoint come from the standard AWS environment/config
    (`AWS_ENDPOINT_URL_S3` / `AWS_ENDPOINT_URL` for MinIO & co); `EVERGREEN_S3_ENDPOINT_URL`
    or `endpoint_url` override the endpoint. With a custom endpoint, path-style addressing is
    used, as S3-compatible servers expect.

    Retries default to botocore's adaptive mode with 9 attempts (about 30-60 s of backoff when
    the endpoint is down, so a restart of MinIO rides through); an operator's `AWS_RETRY_MODE` /
    `AWS_MAX_ATTEMPTS` (total attempts, as botocore reads them) win, since a value passed to
    the client would otherwise silently override them.
    """
    import boto3
    from botocore.config import Config

    endpoint = endpoint_url or os.environ.get("EVERGREEN_S3_ENDPOINT_URL") or None
    custom = endpoint or os.environ.get("AWS_ENDPOINT_URL_S3") or os.environ.get("AWS_ENDPOINT_URL")
    retries: dict[str, Any] = {}
    if not os.environ.get("AWS_RETRY_MODE"):
        retries["mode"] = "adaptive"
    if not os.environ.get("AWS_MAX_ATTEMPTS"):
        retries["max_attempts"] = 8  # retries after the first attempt: 9 attempts in all
    config = Config(retries=retries, s3={"addressing_style": "path"} if custom else None)
    return boto3.client("s3", endpoint_url=endpoint, config=config)


def open_landing(uri: str, *, s3_client: Any = None) -> LandingZone:
    """The landing zone at `uri`: `s3://bucket/prefix` or a local folder.

    Args:
        uri: `data.landing` from the config.
        s3_client: a boto3 S3 client to use instead of `make_s3_client()` (tests, custom auth).
    """
    if uri.startswith("s3://"):
        return S3LandingZone(uri, s3_client or make_s3_client())
    if "://" in uri and not uri.startswith("file://"):
        raise ValueError(
            f"unsupported landing zone {uri!r}: use a local path or s3://bucket/prefix"
        )
    return LocalLandingZone(uri.removeprefix("file://"))


def _seekable(handle: BinaryIO) -> BinaryIO:
    """Parquet needs random access: spool a streaming body (S3) to memory/disk first."""
    if handle.seekable():
        return handle
    spool = tempfile.SpooledTemporaryFile(max_size=64 * 1024 * 1024)  # noqa: SIM115
    shutil.copyfileobj(handle, spool, 1024 * 1024)
    handle.close()
    spool.seek(0)
    # a binary file, but typeshed types SpooledTemporaryFile as IO[bytes], not BinaryIO
    return spool  # type: ignore[return-value]


def iter_batch_frames(
    zone: LandingZone,
    batch_id: str,
    columns: list[str],
    *,
    chunk_rows: int = 50_000,
    seen_columns: set[str] | None = None,
    text: bool = False,
) -> Iterator[pd.DataFrame]:
    """Stream a batch as DataFrame chunks of at most `chunk_rows` rows.

    Each chunk holds the requested `columns` that the file has (absent ones are left out, for
    validation to report) plus `_source_file`. Files are checked against the first file's
    schema once read; a mismatch raises after that file's chunks were yielded, so use
    `read_batch` when all-or-nothing matters. Every column the files hold (requested or not) is
    added to `seen_columns` when given. `text`: a text batch (CSV cells read as written: only
    an empty cell is missing, not the word 'NA' or 'None').

    Raises:
        BatchReadError: no data files, an empty/corrupt/non-UTF-8/unparseable file, or files
            whose schemas differ.
    """
    refs = zone.list_files(batch_id)
    if not refs:
        raise BatchReadError(batch_id, None, f"no {'/'.join(SUPPORTED_SUFFIXES)} files")
    first: readers.FileSchema | None = None
    for ref in refs:
        schema = readers.FileSchema(ref.name)
        if ref.size == 0:
            raise BatchReadError(batch_id, ref.name, "the file is empty (0 bytes)")
        handle = zone.open(ref)
        if ref.name.lower().endswith(".parquet"):
            handle = _seekable(handle)
        with handle:
            yield from readers.read_file(handle, ref, columns, chunk_rows, schema, text=text)
        if seen_columns is not None:
            seen_columns.update(schema.columns)
        if first is None:
            first = schema
        else:
            first.check_same(schema, batch_id)


def read_batch(
    zone: LandingZone, batch_id: str, data_cfg: DataConfig, *, chunk_rows: int = 50_000
) -> pd.DataFrame:
    """All files of one batch as one DataFrame (one batch in memory at a time, never history).

    Reads the configured feature/text and label columns that exist (plus `_source_file`);
    nullable integer/float columns come back as NumPy dtypes (float64 where values are missing).
    `frame.attrs[COLUMNS_IN_FILES_ATTR]` lists every column the files hold, so validation can
    name columns the config does not know.

    Raises:
        BatchReadError: see `iter_batch_frames`.
    """
    seen: set[str] = set()
    frames = list(
        iter_batch_frames(
            zone,
            batch_id,
            file_columns(data_cfg),
            chunk_rows=chunk_rows,
            seen_columns=seen,
            text=bool(data_cfg.text),
        )
    )
    frame = pd.concat(frames, ignore_index=True) if len(frames) > 1 else frames[0]
    frame = readers.numpy_dtypes(frame.reset_index(drop=True))
    if data_cfg.text_only:  # a causal LM's text has no label: one placeholder class
        frame[data_cfg.label] = data_cfg.classes[0]
    elif data_cfg.label in frame.columns and data_cfg.classes:
        frame[data_cfg.label] = canonical_labels(frame[data_cfg.label], list(data_cfg.classes))
    frame.attrs[COLUMNS_IN_FILES_ATTR] = sorted(seen)
    return frame


def write_frame(
    zone: LandingZone,
    batch_id: str,
    df: pd.DataFrame,
    *,
    fmt: str = "parquet",
    name: str | None = None,
) -> None:
    """Write `df` into the batch as one file (`fmt`: parquet, csv or jsonl).

    The default name is the first free `part-NNNNN.<ext>` of the batch.
    JSON has no infinity: pandas writes ±inf as null in JSON Lines (use Parquet or CSV to keep it).
    """
    if fmt not in _FORMATS:
        raise ValueError(f"unknown format {fmt!r}: expected one of {', '.join(_FORMATS)}")
    if name is None:
        taken = {ref.name.rsplit(".", 1)[0] for ref in zone.list_files(batch_id)}
        index = next(i for i in range(len(taken) + 1) if f"part-{i:05d}" not in taken)
        name = f"part-{index:05d}{_FORMATS[fmt]}"
    buffer = io.BytesIO()
    if fmt == "parquet":
        df.to_parquet(buffer, index=False)
    elif fmt == "csv":
        buffer.write(df.to_csv(index=False).encode("utf-8"))
    else:
        buffer.write(df.to_json(orient="records", lines=True).encode("utf-8"))
    zone.write_bytes(batch_id, name, buffer.getvalue())
