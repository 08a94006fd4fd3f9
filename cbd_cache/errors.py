"""Every failure a user can cause or suffer, by what the command line does with it.

Each is raised with one line that says what is wrong and what to do. `cli.py` prints that line and
exits 2 for bad input (`BAD_INPUT`: fix the config, the data or the cache location) or 1 for a stage
that failed (`FAILED_STAGE`: a damaged file, a busy lock, a diverged run); anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations

import errno
import shlex
import signal


class ConfigError(ValueError):
    """A bad pipeline file, key or value. The CLI prints it on one line and exits 2."""


class CacheError(RuntimeError):
    """A cache that is missing, incomplete, or does not match the data or teachers it is asked to serve."""


class CacheDamaged(RuntimeError):
    """A cache whose stored bytes are not what export wrote: a chunk or array metadata missing, truncated,
    changed. The CLI exits 1; `cbd-cache export --repair` rewrites what is damaged."""


class ShardDamaged(RuntimeError):
    """A shard that no longer holds what prepare wrote, or an image in it that does not decode. The CLI exits 1."""


class NonFiniteLoss(FloatingPointError):
    """Training went non-finite (the loss, a weight or a buffer such as BatchNorm's running_var): the step, the
    tensor, the lr and the last good resume checkpoint; or a model file holds non-finite values. The CLI exits 1."""


class FileDamaged(RuntimeError):
    """A file the tool wrote that no longer reads back as written (torn JSON, a truncated checkpoint, metadata
    edited by hand): the line names the file and the command that rebuilds it. The CLI exits 1."""


class Busy(RuntimeError):
    """Another process holds the lock. The CLI prints it on one line and exits 1."""


class Interrupted(KeyboardInterrupt):
    """Stopped by SIGTERM or SIGINT (`system.signals`): `signum`, and where a training stage saved its resume
    point (`saved`, or ""). The CLI prints one line and exits 128 + signum (143, 130), as the shell counts it."""

    def __init__(self, signum: int, saved: str = ""):
        super().__init__(signal.Signals(signum).name)
        self.signum, self.saved = signum, saved


class JobsFailed(RuntimeError):
    """Some of the parallel processes exited non-zero (their own errors are in their logs, or above)."""


class DataError(ConfigError):
    """A problem in the dataset's own files (a bad label line, a missing image): exit 2 with the offending line."""


BAD_INPUT = (ConfigError, CacheError, FileNotFoundError)                        # exit 2
FAILED_STAGE = (NonFiniteLoss, JobsFailed, Busy, ShardDamaged, CacheDamaged, FileDamaged)    # exit 1
NO_SPACE = (errno.ENOSPC, errno.EDQUOT)                                          # exit 1: free space, run again
NOT_WRITABLE = (errno.EROFS, errno.EACCES, errno.EPERM)                          # exit 2: another --workdir
WRONG_KIND = {errno.EISDIR: "is a folder where a file belongs", errno.ENOTDIR: "lies under a file, not a folder",
              errno.EEXIST: "is a file where a folder belongs"}                 # exit 2: another path
TRAINING = ("train-teacher", "train-student", "run", "sweep", "paper-table")    # commands that continue from resume.pt


def one_line(e: BaseException) -> str:
    """The message; for an exception a DataLoader worker re-raised (its text holds the worker's
    traceback), the original message, from the traceback's last line."""
    text = str(e)
    if "Original Traceback" in text:
        last = text.strip().splitlines()[-1]
        text = last.split(": ", 1)[1] if ": " in last else last
    return text


def os_error_line(e: OSError, command: str) -> tuple[str, int] | None:
    """(one line, exit code) for the OS errors a user can fix (a full disk, a read-only workdir), else None."""
    where = shlex.quote(str(e.filename)) if e.filename else "the workdir"
    if e.errno in NO_SPACE:
        again = " (training continues from its last resume point)" if command in TRAINING else ""
        return (f"no space left on the device writing {where}: free some space, then run the same command "
                f"again{again}; what was finished is kept"), 1
    if e.errno in NOT_WRITABLE:
        return f"cannot write {where} ({e.strerror}): choose a writable --workdir, or make it writable", 2
    if e.errno in WRONG_KIND:
        return f"{where} {WRONG_KIND[e.errno]}: choose another path (--workdir, --out, ...)", 2
    return None


def interrupted_line(e: KeyboardInterrupt, command: str) -> tuple[str, int]:
    """(one line, 143 or 130) for a command stopped by SIGTERM or Ctrl-C."""
    signum = e.signum if isinstance(e, Interrupted) else signal.SIGINT
    saved = f" and wrote its resume point {shlex.quote(e.saved)}" if isinstance(e, Interrupted) and e.saved else ""
    again = " (training continues from its last resume point)" if command in TRAINING and not saved else ""
    return (f"interrupted by {signal.Signals(signum).name}: {command} stopped before it finished{saved}; "
            f"run the same command again{again} to continue"), 128 + signum


def exit_line(e: BaseException, command: str) -> tuple[str, int] | None:
    """(one line, exit code) of an expected failure; None for anything else (a bug: keep its traceback)."""
    if isinstance(e, OSError) and not isinstance(e, FileNotFoundError):
        return os_error_line(e, command)
    if isinstance(e, BAD_INPUT):
        return one_line(e), 2
    if isinstance(e, FAILED_STAGE):
        return one_line(e), 1
    return None


def stalled_line(rank: int | None, world: int, me: int, seconds: float, why: str = "") -> str:
    """The line a torchrun rank prints before it exits 1 because another rank (or the store) stopped answering."""
    first = (why.strip().splitlines() or [""])[0][:160]
    who = f"rank {rank} of {world}" if rank is not None else f"the rendezvous store ({first})"
    return (f"{who} has not answered for {seconds:.0f} s (stopped, hung, or its machine lost): rank {me} gives up "
            "(pipeline.rank_timeout_minutes sets how long to wait); find out what stopped it, then run the same "
            "command again (training continues from its last resume point)")
