"""Progress display for long work (store creation, data preparation, evaluation, the benches'
phases, the training loop), decided in one place: bars are drawn when stdout is a terminal (a
person is watching) and never otherwise (a log file, a pipe, `--json`, the tests), where the
plain log lines are what is wanted. Bars go to stderr, so stdout stays the command's output.

`GMTIER_PROGRESS=1` / `=0` forces the display on or off (e.g. on under `script`, off in a
terminal whose scrollback should hold only log lines)."""

from __future__ import annotations

import contextlib
import os
import sys
from typing import Iterable

from tqdm import tqdm

ENV = "GMTIER_PROGRESS"


def interactive() -> bool:
    """Whether progress bars are drawn (stdout is a terminal, unless GMTIER_PROGRESS says otherwise)."""
    forced = os.environ.get(ENV, "").strip()
    if forced in ("0", "1"):
        return forced == "1"
    return sys.stdout.isatty()


def bar(iterable: Iterable | None = None, *, total: float | None = None, desc: str | None = None,
        unit: str = "it", **kwargs) -> tqdm:
    """A tqdm bar on stderr, disabled (a no-op that still iterates) when not `interactive()`.
    It is cleared when done (`leave=False`): the log line that follows states the result."""
    kwargs.setdefault("leave", False)
    # Follow the terminal's width where it reports one; else a fixed width, as tqdm draws nothing
    # at the 0 columns of a pty nobody sized (`script` without a terminal).
    width = {"dynamic_ncols": True} if _width_known() else {"ncols": 120, "nrows": 24}
    return tqdm(iterable, total=total, desc=desc, unit=unit, file=sys.stderr, disable=not interactive(),
                **width, **kwargs)


def _width_known() -> bool:
    try:
        return os.get_terminal_size(sys.stderr.fileno()).columns > 0
    except (OSError, ValueError, AttributeError):
        return False


def counted(fn, progress: tqdm):
    """`fn` that advances `progress` by one after each call (per-record callbacks such as the
    `init` of a store's `create`)."""
    def call(*args, **kwargs):
        out = fn(*args, **kwargs)
        progress.update(1)
        return out
    return call


def echo(line: str, err: bool = False) -> None:
    """Print a log line without tearing a bar that is being drawn (tqdm clears it, then redraws)."""
    import click

    with tqdm.external_write_mode(file=sys.stderr if err else sys.stdout):
        click.echo(line, err=err)


@contextlib.contextmanager
def phase(progress: tqdm, name: str):
    """One named phase of a bench: the bar shows `name` while it runs and advances when it ends."""
    progress.set_description_str(name)
    yield
    progress.update(1)
