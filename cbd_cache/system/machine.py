"""What a number was measured on: the machine, torch, and the code's commit. Benchmarks and the paper table
write these beside their timings, so that a time is never read without the machine that made it."""
from __future__ import annotations

import platform
import subprocess
import time
from pathlib import Path

import torch

from cbd_cache.system.runtime import cpu_count

CHECKOUT = Path(__file__).resolve().parents[2]   # the repository root when cbd_cache runs from a checkout


def machine() -> dict:
    """The machine and torch settings a number was measured with."""
    model = platform.processor()
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    gpu = torch.cuda.get_device_name(0) if torch.cuda.is_available() else None
    return {"cpu": model, "cores": cpu_count(), "gpu": gpu, "torch": torch.__version__,
            "torch_threads": torch.get_num_threads(), "python": platform.python_version(),
            "date_utc": time.strftime("%Y-%m-%d %H:%M", time.gmtime())}


def machine_text(m: dict) -> str:
    """One line for a report: 'Intel Xeon ..., 2 cores, GPU none, torch 2.14.1'."""
    return f"{m['cpu'] or 'unknown CPU'}, {m['cores']} cores, GPU {m['gpu'] or 'none'}, torch {m['torch']}"


def code_commit(root: Path = CHECKOUT) -> str:
    """The checkout's short commit, with "+changes" when its tracked files differ from it; "unknown" outside git."""
    def git(*args: str) -> str:
        return subprocess.run(["git", *args], cwd=root, capture_output=True, text=True, timeout=30).stdout.strip()
    try:
        head = git("rev-parse", "--short", "HEAD")
        changed = head and git("status", "--porcelain", "--untracked-files=no")
        return (head + ("+changes" if changed else "")) or "unknown"
    except (OSError, subprocess.SubprocessError):
        return "unknown"
