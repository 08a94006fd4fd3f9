"""The CLI as a user meets it, for the fault tests: one command in a subprocess (`cli`), or a group of them in
one subprocess (`batch`: importing torch costs seconds a process), each with its own exit code and output;
the one error line of a failed command (`error_line`), and the hashes of files that must not change."""
from __future__ import annotations

import base64
import hashlib
import json
import os
import subprocess
import sys
from pathlib import Path

from .conftest import ROOT, SMOKE

CLI = [sys.executable, "-m", "cli"]


def cli(*args: str, workdir: Path, timeout: int = 300) -> subprocess.CompletedProcess:
    env = {**os.environ, "OMP_NUM_THREADS": "1"}
    return subprocess.run([*CLI, args[0], "--pipeline", str(SMOKE), "--workdir", str(workdir), *args[1:]],
                          cwd=ROOT, env=env, capture_output=True, text=True, timeout=timeout)


def error_line(result: subprocess.CompletedProcess, code: int) -> str:
    """The one error line of a failed command: its exit code, no traceback."""
    assert result.returncode == code, result.stderr[-3000:]
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    errors = [line for line in result.stderr.splitlines() if line.startswith("cbd-cache: ")]
    assert len(errors) == 1, result.stderr[-3000:]
    return errors[0]


def hashes(root: Path, *parts: str) -> dict[str, str]:
    """sha256 of every file under root/part (for files that must not change)."""
    out = {}
    for part in parts:
        for f in sorted((root / part).rglob("*")) if (root / part).is_dir() else [root / part]:
            if f.is_file() and not f.name.endswith(".lock"):
                out[str(f.relative_to(root))] = hashlib.sha256(f.read_bytes()).hexdigest()
    return out


# Importing the CLI (torch, torchvision) costs seconds, so one subprocess runs a group of cases in turn, each
# through `cli.main` as the shell would call it, with its own exit code, stdout and stderr. A case may first
# write files (a torn copy, the original back) or delete them.
DRIVER = r"""
import base64, contextlib, io, json, os, sys, traceback
import cli
os.umask(0o022)
results = []
for case in json.load(open(sys.argv[1])):
    for path, data in case["files"].items():
        if data is None:
            os.unlink(path)
        else:
            open(path, "wb").write(base64.b64decode(data))
    out, err, code = io.StringIO(), io.StringIO(), 0
    with contextlib.redirect_stdout(out), contextlib.redirect_stderr(err):
        try:
            cli.main(case["args"], prog_name="cbd-cache")
        except SystemExit as e:
            code = e.code if isinstance(e.code, int) else int(e.code is not None)
        except BaseException:
            traceback.print_exc()
            code = -1
    results.append({"returncode": code, "stdout": out.getvalue(), "stderr": err.getvalue()})
json.dump(results, open(sys.argv[2], "w"))
"""


def case(*args: str, workdir: Path, files: dict[Path, bytes | None] | None = None) -> dict:
    """One CLI call of a batch: `cbd-cache CMD --pipeline smoke --workdir W ARGS` ("cache verify": two words),
    after writing `files`."""
    return {"args": [*args[0].split(), "--pipeline", str(SMOKE), "--workdir", str(workdir), *map(str, args[1:])],
            "files": {str(p): None if b is None else base64.b64encode(b).decode() for p, b in (files or {}).items()}}


def batch(cases: list[dict], tmp_path: Path) -> list[subprocess.CompletedProcess]:
    """Run the cases in turn in one CLI process; their results, as subprocess.run would give them one by one."""
    (tmp_path / "cases.json").write_text(json.dumps(cases))
    done = subprocess.run([sys.executable, "-c", DRIVER, str(tmp_path / "cases.json"), str(tmp_path / "results.json")],
                          cwd=ROOT, env={**os.environ, "OMP_NUM_THREADS": "1"}, capture_output=True, text=True,
                          timeout=600)
    assert done.returncode == 0, done.stderr[-3000:]
    return [subprocess.CompletedProcess(c["args"], r["returncode"], r["stdout"], r["stderr"])
            for c, r in zip(cases, json.loads((tmp_path / "results.json").read_text()))]


def torn(path: Path) -> bytes:
    return path.read_bytes()[: path.stat().st_size // 2]


def edited(path: Path, edit) -> bytes:
    d = json.loads(path.read_text())
    edit(d)
    return json.dumps(d).encode()
