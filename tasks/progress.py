"""Progress bars for long loops: rich on a terminal, nothing extra in worker logs."""

from __future__ import annotations

import sys
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.progress import BarColumn, Progress, TextColumn, TimeRemainingColumn


@contextmanager
def step_progress(label: str, total: int) -> Iterator[Callable[[int, float], None] | None]:
    """Yield an `on_step(step, loss)` callback that drives a progress bar (None off a terminal)."""
    if not sys.stderr.isatty():
        yield None
        return
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        TextColumn("{task.completed}/{task.total} steps  loss {task.fields[loss]:.3f}"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, transient=True) as progress:
        bar = progress.add_task(label, total=total, loss=float("nan"))

        def on_step(step: int, loss: float) -> None:
            progress.update(bar, completed=step + 1, loss=loss)

        yield on_step
