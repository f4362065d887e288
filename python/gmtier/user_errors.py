"""How a command shows an error the user can fix: one line naming the problem and the fix, exit 1,
no traceback. Every gmtier command is a `Command`, so this is the one place that decides; an
exception it does not know is a bug and keeps its traceback."""

from __future__ import annotations

import errno
import signal

import click


class StoppedBySignal(Exception):
    """Training stopped early on SIGTERM after writing a checkpoint (`gmtier.train.StopOnSigterm`);
    a command ends with the shell's status for SIGTERM, 143."""


def user_message(e: BaseException) -> str | None:
    """The one-line message for an error the user can fix, or None for a bug."""
    from gmtier._core import StoreError
    from gmtier.checkpoint import CheckpointError
    from gmtier.config import ConfigError
    from gmtier.data import DataError

    if isinstance(e, (StoreError, ConfigError, DataError, CheckpointError)):
        return " ".join(str(e).split("\n"))
    if isinstance(e, UnicodeDecodeError):  # the read sites name the file; this is a last resort
        return f"not UTF-8 text ({e.reason} at byte {e.start}); convert the file to UTF-8"
    if isinstance(e, OSError):  # a file or the disk, not the code
        if e.filename is None:  # the Rust store names its files in the message
            return " ".join(str(e).split("\n"))
        if e.errno == errno.ENOSPC:
            return f"{e.filename}: no space left on device; free some space or put the run (train.run_dir) on another disk"
        if isinstance(e, FileNotFoundError):
            return f"{e.filename}: no such file or directory; check the path"
        if isinstance(e, PermissionError):
            return f"{e.filename}: permission denied; check the file's owner and mode"
        return f"{e.filename}: {e.strerror or e}"
    return None


class Command(click.Command):
    """A click command whose user errors (see `user_message`) end in one line instead of a traceback."""

    def invoke(self, ctx: click.Context):
        try:
            return super().invoke(ctx)
        except click.ClickException:
            raise
        except StoppedBySignal:
            raise SystemExit(128 + signal.SIGTERM) from None
        except Exception as e:
            message = user_message(e)
            if message is None:
                raise
            raise click.ClickException(message) from None
