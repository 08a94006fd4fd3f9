"""Every failure a user can cause or suffer, by what the command line does with it.

Each is raised with one line that says what is wrong and what to do. `cli.py` prints that line and
exits 2 for bad input (`BAD_INPUT`: fix the config, the data or the cache location) or 1 for a stage
that failed (`FAILED_STAGE`: a damaged file, a busy lock, a diverged run); anything else is a bug
and keeps its traceback.
"""
from __future__ import annotations


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
    pass


class Busy(RuntimeError):
    """Another process holds the lock. The CLI prints it on one line and exits 1."""


class JobsFailed(RuntimeError):
    """Some of the parallel processes exited non-zero (their own errors are in their logs, or above)."""


class DataError(ConfigError):
    """A problem in the dataset's own files (a bad label line, a missing image): exit 2 with the offending line."""
