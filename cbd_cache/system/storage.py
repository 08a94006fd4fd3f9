"""Paths and fsspec URLs alike: join, open, exist, remove, upload; atomic writes and JSON files.

The data folder (manifest + shards) and the cache may live on a shared filesystem or on any fsspec
URL (`s3://bucket/prefix`, `gs://...`, `memory://...`). A `Location` is then a URL string instead of
a Path; every function here treats both alike.
"""
from __future__ import annotations

import errno
import json
import os
import stat
import tempfile
from pathlib import Path
from typing import Any

import fsspec

Location = Path | str   # a local path, or an fsspec URL string


def is_url(loc: Location) -> bool:
    """True for a URL that needs fsspec; `file://` URLs and plain paths are local."""
    return isinstance(loc, str) and "://" in loc and not loc.startswith("file://")


def location(text: str) -> Location:
    """A path or URL from the config: a Path when local, the URL string otherwise."""
    if text.startswith("file://"):
        return Path(text[len("file://"):])
    return text.rstrip("/") if is_url(text) else Path(text)


def join(loc: Location, name: str) -> Location:
    return f"{loc}/{name}" if is_url(loc) else Path(loc) / name


def parent(loc: Location) -> Location:
    return loc.rsplit("/", 1)[0] if is_url(loc) else Path(loc).parent


def open_file(loc: Location, mode: str = "rb"):
    """A file object for a path or a URL (fsspec)."""
    if not is_url(loc):
        return open(loc, mode)
    return fsspec.open(loc, mode).open()


def exists(loc: Location) -> bool:
    if not is_url(loc):
        return Path(loc).exists()
    fs, path = fsspec.core.url_to_fs(loc)
    return fs.exists(path)


def remove(loc: Location) -> None:
    """Delete one file, local or at a URL."""
    if not is_url(loc):
        Path(loc).unlink()
        return
    fs, path = fsspec.core.url_to_fs(loc)
    fs.rm(path)


def bytes_under(loc: Location) -> int:
    """Bytes stored under a folder or prefix."""
    if not is_url(loc):
        return sum(f.stat().st_size for f in Path(loc).rglob("*") if f.is_file())
    fs, path = fsspec.core.url_to_fs(loc)
    return int(fs.du(path))


def upload(folder: Path, url: str) -> None:
    """Copy a local folder's files to a URL prefix (what `prepare` does for a remote `data_url`)."""
    fs, path = fsspec.core.url_to_fs(url)
    for f in sorted(folder.iterdir()):
        if f.is_file() and not f.name.startswith("."):
            fs.put_file(str(f), f"{path}/{f.name}")


def _umask() -> int:
    mask = os.umask(0)
    os.umask(mask)
    return mask


def _in_place(path: Path) -> bool:
    """True where a rename would replace the wrong thing: a pipe, a device, a socket, or a path under
    /proc or /dev (`/proc/self/fd/1`, `/dev/stdout`) that names an open file rather than a file."""
    if str(path).startswith(("/proc/", "/dev/")):
        return True
    try:
        mode = os.stat(path).st_mode
    except FileNotFoundError:
        return False
    return not (stat.S_ISREG(mode) or stat.S_ISDIR(mode))


def atomic_write_bytes(path: Path, data: bytes) -> None:
    """Write then rename, so a killed process never leaves a half-written file under the final name.

    Only a regular file (or a new one) is replaced so: a symlink is followed and its target written,
    a pipe, device or /proc/self/fd path is written in place, and a folder is refused. The new file
    gets the mode the old one had, or the user's umask (0644 under the usual 022), like any other file.
    """
    path = Path(path)
    if not _in_place(path):
        path = Path(os.path.realpath(path))     # a symlink's target (where it points, even if absent)
    if _in_place(path):
        with open(path, "wb") as f:
            f.write(data)
        return
    if path.is_dir():
        raise IsADirectoryError(errno.EISDIR, "is a folder, not a file", str(path))
    try:
        mode = stat.S_IMODE(path.stat().st_mode)
    except FileNotFoundError:
        mode = 0o666 & ~_umask()
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.")
    try:
        with os.fdopen(fd, "wb") as f:
            os.fchmod(f.fileno(), mode)
            f.write(data)
        os.replace(tmp, path)
    except BaseException:
        Path(tmp).unlink(missing_ok=True)
        raise


def write_json(path: Path, obj: Any) -> None:
    atomic_write_bytes(path, (json.dumps(obj, indent=1, sort_keys=False) + "\n").encode())


def read_json(path: Location) -> Any:
    with open_file(path, "rb") as f:
        return json.loads(f.read())
