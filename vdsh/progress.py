"""Progress bars with a time estimate for every long step (decoding, encoding, epochs, sweeps), on stderr.

One switch for the whole process: `set_quiet(True)` (the CLI's `--quiet`, or `VDSH_QUIET=1`) turns every
bar off, so scripts get only the results on stdout. Bars go to stderr so that stdout stays parseable
(`vdsh encode` prints codes there).
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

_quiet = False


def set_quiet(quiet: bool) -> None:
    """Turn every progress bar (and `note`) of this process off or on."""
    global _quiet
    _quiet = quiet


def is_quiet() -> bool:
    return _quiet or os.environ.get("VDSH_QUIET", "") not in ("", "0")


def note(message: str) -> None:
    """One line of context on stderr (what a run is about to do, where validation comes from), unless quiet."""
    if not is_quiet():
        Console(stderr=True, highlight=False, soft_wrap=True).print(message)


@contextmanager
def progress_bar(description: str, total: int | None, enabled: bool = True) -> Iterator[Callable[..., None]]:
    """A bar for `total` steps; yields `advance(steps=1, status=None)`, where status replaces the text after
    the description (e.g. the last epoch's loss). Elapsed and estimated remaining time are shown.
    enabled False (or quiet): no bar, `advance` does nothing visible."""
    with Progress(
        TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(), TextColumn("elapsed"),
        TimeElapsedColumn(), TextColumn("left"), TimeRemainingColumn(), TextColumn("{task.fields[status]}"),
        console=Console(stderr=True), disable=is_quiet() or not enabled, transient=False,
    ) as bar:
        task = bar.add_task(description, total=total, status="")

        def advance(steps: int = 1, status: str | None = None) -> None:
            bar.update(task, advance=steps, **({"status": status} if status is not None else {}))

        yield advance
