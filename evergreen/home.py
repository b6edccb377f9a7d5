"""Which evergreen.yaml a command uses when none is named, and the pointer `evergreen demo` leaves.

Order (first hit wins), so that `evergreen status` typed in the checkout after `make demo` answers
about the demo, and typed inside a project answers about that project:

1. `--config PATH` (or a flow's `config_path` parameter);
2. `$EVERGREEN_CONFIG`;
3. the nearest `evergreen.yaml` in the working directory or one of its parents;
4. the nearest `.evergreen/current-config` pointer (written by `evergreen demo`), which holds the
   path of the config the last demo wrote.

Commands print which one they used (to stderr; `--quiet` silences it).
"""

from __future__ import annotations

import os
from dataclasses import dataclass
from pathlib import Path

CONFIG_NAME = "evergreen.yaml"
POINTER = Path(".evergreen") / "current-config"


@dataclass(frozen=True)
class FoundConfig:
    path: Path
    source: str  # "--config", "$EVERGREEN_CONFIG", "nearest evergreen.yaml", "pointer <file>"


def _parents(start: Path) -> list[Path]:
    start = start.resolve()
    return [start, *start.parents]


def find_config(explicit: str | Path | None = None, cwd: Path | None = None) -> FoundConfig:
    """The config file a command should read (see the module docstring for the order).

    Raises:
        FileNotFoundError: nothing found, or the named/pointed-to file does not exist; the
            message says what was looked for and how to create one.
    """
    if explicit:
        return _existing(Path(explicit), "--config")
    if os.environ.get("EVERGREEN_CONFIG"):
        return _existing(Path(os.environ["EVERGREEN_CONFIG"]), "$EVERGREEN_CONFIG")
    here = Path.cwd() if cwd is None else cwd
    for folder in _parents(here):
        if (folder / CONFIG_NAME).is_file():
            return FoundConfig(folder / CONFIG_NAME, f"nearest {CONFIG_NAME}")
    for folder in _parents(here):
        pointer = folder / POINTER
        if pointer.is_file():
            target = Path(pointer.read_text().strip())
            return _existing(target, f"pointer {pointer}")
    raise FileNotFoundError(
        f"no {CONFIG_NAME} in {here} or its parents (and no demo pointer {POINTER}): "
        "run `evergreen init` to write one, `make demo` for the demo, or pass --config PATH"
    )


def _existing(path: Path, source: str) -> FoundConfig:
    if not path.is_file():
        raise FileNotFoundError(
            f"config file {path} not found ({source}): run `evergreen init` to write an example"
        )
    return FoundConfig(path.resolve(), source)


def write_pointer(config_path: Path, cwd: Path | None = None) -> Path:
    """Leave `<cwd>/.evergreen/current-config` naming `config_path` (written atomically)."""
    pointer = (Path.cwd() if cwd is None else cwd) / POINTER
    pointer.parent.mkdir(parents=True, exist_ok=True)
    partial = pointer.with_suffix(".tmp")
    partial.write_text(f"{config_path.resolve()}\n")
    partial.replace(pointer)
    return pointer
