"""Streaming readers for landing-zone files (Parquet, CSV, JSON Lines), used by `landing`.

Each reader yields chunks of at most `chunk_rows` rows restricted to the requested columns,
records the file's full column set and the kind of each requested column in a `FileSchema`
(so files of one batch can be compared), and turns format errors into `BatchReadError`s that
say which file is wrong and how to fix it.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterator
from dataclasses import dataclass, field
from typing import Any, BinaryIO

import pandas as pd
import pyarrow as pa
import pyarrow.parquet as pq

SOURCE_COLUMN = "_source_file"
_READ_BLOCK = 1024 * 1024
ARROW_POOL_ENV = "ARROW_DEFAULT_MEMORY_POOL"


def use_system_arrow_pool() -> None:
    """Allocate Arrow buffers (Parquet reads and writes, pandas' Arrow-backed strings) with the C
    library's malloc, unless `ARROW_DEFAULT_MEMORY_POOL` names a pool.

    pyarrow's default pool on this platform is its bundled mimalloc, which keeps memory it has
    freed: in one long-lived process running daily-lora again and again, its reserved region
    grew ≈ 2.8 MB a run while the pool held ≈ 0.1 MB of live buffers (docs/SCALING.md,
    "Growth"). This sets pyarrow's Python-level default; Arrow's C++ default is fixed when
    pyarrow loads, which is why `evergreen/__init__.py` sets the environment variable first.
    """
    if os.environ.get(ARROW_POOL_ENV, "system") == "system":
        pa.set_memory_pool(pa.system_memory_pool())


@dataclass(frozen=True)
class FileRef:
    """One data file of a batch (`uri` is the full path or `s3://` address)."""

    batch_id: str
    name: str
    size: int
    uri: str


class BatchReadError(Exception):
    """A batch cannot be read; `str()` names the batch, the file and the fix."""

    def __init__(self, batch_id: str, file: str | None, reason: str) -> None:
        self.batch_id = batch_id
        self.file = file
        self.reason = reason
        super().__init__(str(self))

    def __str__(self) -> str:
        where = f"batch {self.batch_id!r}" + (f", file {self.file!r}" if self.file else "")
        return f"{where}: {self.reason}"


def _column_kind(series: pd.Series) -> str | None:
    """Coarse kind of a column: numeric, string, bool, datetime, mixed; None if all missing."""
    if series.isna().all():
        return None
    dtype = series.dtype
    if pd.api.types.is_bool_dtype(dtype):
        return "bool"
    if pd.api.types.is_numeric_dtype(dtype):
        return "numeric"
    if pd.api.types.is_datetime64_any_dtype(dtype):
        return "datetime"
    inferred = pd.api.types.infer_dtype(series, skipna=True)
    if inferred == "string":
        return "string"
    if inferred in ("integer", "floating", "mixed-integer-float", "decimal"):
        return "numeric"
    return "bool" if inferred == "boolean" else "mixed"


@dataclass
class FileSchema:
    """What one file turned out to hold: all its columns and the kinds of the requested ones."""

    name: str
    columns: set[str] = field(default_factory=set)
    kinds: dict[str, str | None] = field(default_factory=dict)
    rows: int = 0

    def observe(self, frame: pd.DataFrame, requested: list[str]) -> None:
        self.columns.update(map(str, frame.columns))
        self.rows += len(frame)
        for column in requested:
            if column not in frame.columns:
                continue
            kind, seen = _column_kind(frame[column]), self.kinds.get(column)
            if seen is None or kind is None or seen == kind:
                self.kinds[column] = seen if kind is None else kind
            else:
                self.kinds[column] = "mixed"

    def check_same(self, other: FileSchema, batch_id: str) -> None:
        """Raise if `other` (a later file of the batch) has other columns or column kinds."""
        if self.columns != other.columns:
            only_first = sorted(self.columns - other.columns)
            only_other = sorted(other.columns - self.columns)
            raise BatchReadError(
                batch_id,
                other.name,
                f"mixed schemas: its columns differ from {self.name!r} (only in {self.name!r}: "
                f"{only_first}; only in {other.name!r}: {only_other}) — every file of a batch "
                "must have the same columns",
            )
        pairs = {c: (k, other.kinds.get(c)) for c, k in self.kinds.items()}
        differing = {
            c: (a, b) for c, (a, b) in pairs.items() if a and b and a != b and "mixed" not in (a, b)
        }
        if differing:
            detail = "; ".join(f"{c!r}: {a} vs {b}" for c, (a, b) in sorted(differing.items()))
            raise BatchReadError(
                batch_id,
                other.name,
                f"mixed schemas: column types differ from {self.name!r} ({detail}) — every file "
                "of a batch must use the same type per column",
            )


def numpy_dtypes(frame: pd.DataFrame) -> pd.DataFrame:
    """Nullable Int/Float columns (pandas metadata in Parquet) → NumPy int64/float64 + NaN."""
    for column in frame.columns:
        dtype = frame[column].dtype
        if isinstance(dtype, pd.api.extensions.ExtensionDtype) and pd.api.types.is_numeric_dtype(
            dtype
        ):
            if pd.api.types.is_bool_dtype(dtype):
                continue
            series = frame[column]
            # masked (Int64, Float64) and Arrow dtypes have numpy_dtype; pandas-stubs omit it
            target = "float64" if series.isna().any() else dtype.numpy_dtype  # type: ignore[attr-defined]
            frame[column] = series.to_numpy(dtype=target, na_value=float("nan"))
    return frame


def _emit(
    frame: pd.DataFrame, ref: FileRef, columns: list[str], schema: FileSchema
) -> pd.DataFrame:
    schema.observe(frame, columns)
    present = [c for c in columns if c in frame.columns]
    out = numpy_dtypes(frame.loc[:, present].copy())
    out[SOURCE_COLUMN] = ref.name
    return out


def _pandas_index_columns(arrow_schema: pa.Schema) -> set[str]:
    """The columns pandas stored a DataFrame's index in (`__index_level_0__` after a shuffle or
    a filter, or the index's name): pandas reads them back as the index, so they are not data.
    A RangeIndex is stored as metadata only and has no column."""
    try:
        metadata = arrow_schema.pandas_metadata or {}
    except (ValueError, TypeError):  # malformed pandas metadata: every column is data
        return set()
    return {c for c in metadata.get("index_columns", []) if isinstance(c, str)}


def _iter_parquet(
    handle: BinaryIO, ref: FileRef, chunk_rows: int, columns: list[str], schema: FileSchema
) -> Iterator[pd.DataFrame]:
    try:
        # pre_buffer reads ahead whole row groups (for high-latency stores); the handle is a
        # local or spooled file, where it only adds memory: 1M×64 float32 peaks ~300 MiB lower
        parquet = pq.ParquetFile(handle, pre_buffer=False)
        index = _pandas_index_columns(parquet.schema_arrow)
        names = [n for n in parquet.schema_arrow.names if n not in index or n in columns]
        schema.columns.update(names)  # only the requested columns are read
        present = [c for c in columns if c in names]
        for record_batch in parquet.iter_batches(batch_size=chunk_rows, columns=present):
            yield record_batch.to_pandas()
    except (pa.ArrowException, OSError) as exc:
        raise BatchReadError(
            ref.batch_id,
            ref.name,
            f"not a readable Parquet file — truncated or corrupt ({exc}); re-upload it",
        ) from exc


def _iter_csv(
    handle: BinaryIO, ref: FileRef, chunk_rows: int, *, literal: bool = False
) -> Iterator[pd.DataFrame]:
    # literal (a text batch): cells as written, only an empty cell is missing — pandas' default
    # would read the sentences 'NA', 'None', 'null' or 'nan' as missing values
    missing: dict[str, Any] = {"keep_default_na": False, "na_values": [""]} if literal else {}
    try:
        for chunk in pd.read_csv(
            handle, chunksize=chunk_rows, encoding="utf-8", encoding_errors="strict", **missing
        ):
            _require_commas(chunk, ref)
            yield chunk
    except pd.errors.EmptyDataError as exc:
        raise BatchReadError(
            ref.batch_id, ref.name, "the CSV file is empty (no header row)"
        ) from exc
    except UnicodeDecodeError as exc:
        bad = exc.object[exc.start : exc.start + 1].hex()
        raise BatchReadError(
            ref.batch_id,
            ref.name,
            f"the CSV file is not valid UTF-8 (byte 0x{bad}: {exc.reason}) — re-export it as UTF-8",
        ) from exc
    except pd.errors.ParserError as exc:
        raise BatchReadError(ref.batch_id, ref.name, f"malformed CSV ({exc})") from exc


def _require_commas(chunk: pd.DataFrame, ref: FileRef) -> None:
    """A CSV written with another separator (a European spreadsheet's ';', a tab) reads as one
    column whose name holds all the others: say so, instead of "every column is missing".

    Raises:
        BatchReadError: the header is a single column that splits on ';', a tab or '|'.
    """
    if chunk.shape[1] != 1:
        return
    header = str(chunk.columns[0])
    for separator, name in ((";", "';'"), ("\t", "tab"), ("|", "'|'")):
        if len(header.split(separator)) > 1:
            raise BatchReadError(
                ref.batch_id,
                ref.name,
                f"the CSV file looks {name}-separated (its header reads as one column, "
                f"{header[:60]!r}): CSV batches must be comma-separated — re-export it with ','"
                " separators and '.' decimals, or as Parquet",
            )


def _lines(handle: BinaryIO) -> Iterator[bytes]:
    pending = b""
    while block := handle.read(_READ_BLOCK):
        pending += block
        *complete, pending = pending.split(b"\n")
        yield from complete
    if pending:
        yield pending


def _json_record(raw: bytes, lineno: int, ref: FileRef) -> dict[str, Any] | None:
    text = raw.strip()
    if not text:
        return None
    if lineno == 1 and text.startswith(b"["):
        raise BatchReadError(
            ref.batch_id,
            ref.name,
            "holds a JSON array; expected JSON Lines (one object per line, e.g. pandas "
            "`to_json(orient='records', lines=True)`)",
        )
    try:
        record = json.loads(text.decode("utf-8"))
    except UnicodeDecodeError as exc:
        raise BatchReadError(ref.batch_id, ref.name, f"line {lineno} is not valid UTF-8") from exc
    except json.JSONDecodeError as exc:
        raise BatchReadError(
            ref.batch_id,
            ref.name,
            f"line {lineno} is not valid JSON ({exc.msg} at column {exc.colno})",
        ) from exc
    if not isinstance(record, dict):
        raise BatchReadError(
            ref.batch_id,
            ref.name,
            f"line {lineno} is a JSON {type(record).__name__}; expected one object per line",
        )
    return record


def _iter_jsonl(handle: BinaryIO, ref: FileRef, chunk_rows: int) -> Iterator[pd.DataFrame]:
    records: list[dict[str, Any]] = []
    for lineno, raw in enumerate(_lines(handle), start=1):
        record = _json_record(raw, lineno, ref)
        if record is not None:
            records.append(record)
        if len(records) >= chunk_rows:
            yield pd.DataFrame.from_records(records)
            records = []
    if records:
        yield pd.DataFrame.from_records(records)


def read_file(
    handle: BinaryIO,
    ref: FileRef,
    columns: list[str],
    chunk_rows: int,
    schema: FileSchema,
    *,
    text: bool = False,
) -> Iterator[pd.DataFrame]:
    """Chunks of one file (requested columns that exist + `_source_file`). `text`: a text
    batch, whose CSV cells are read as written (only an empty cell is missing).

    Raises:
        BatchReadError: the file is unreadable or holds no rows.
    """
    suffix = ref.name.lower().rsplit(".", 1)[-1]
    if suffix == "parquet":
        chunks = _iter_parquet(handle, ref, chunk_rows, columns, schema)
    elif suffix == "csv":
        chunks = _iter_csv(handle, ref, chunk_rows, literal=text)
    else:
        chunks = _iter_jsonl(handle, ref, chunk_rows)
    for frame in chunks:
        if len(frame):
            yield _emit(frame, ref, columns, schema)
        else:
            schema.observe(frame, columns)
    if schema.rows == 0:
        raise BatchReadError(
            ref.batch_id, ref.name, "the file holds no rows (a header or schema only)"
        )
