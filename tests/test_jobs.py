"""Parallel jobs never outlive their parent: SIGTERM to the parent alone stops them, and so does its SIGKILL."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import time

import pytest

from .conftest import ROOT

# A job that says when it starts and, on SIGTERM, says so (as a training job saves its resume point) and leaves.
JOB = r"""
import pathlib, signal, sys, time
out = pathlib.Path(sys.argv[1])
def stop(*_):
    out.with_suffix(".stopped").write_text("SIGTERM")
    sys.exit(143)
signal.signal(signal.SIGTERM, stop)
out.write_text("started")
time.sleep(120)
"""

# The parent: run_parallel over two such jobs, with a short grace for the test.
PARENT = r"""
import sys
from cbd_cache.system import jobs
from cbd_cache.system.signals import raise_on_signals
raise_on_signals()
jobs.GRACE_S = 0.5
folder = sys.argv[1]
jobs.run_parallel([[sys.executable, "-c", sys.argv[2], f"{folder}/job{i}"] for i in range(2)], 2, 0)
"""


def start_parent(tmp_path) -> subprocess.Popen:
    proc = subprocess.Popen([sys.executable, "-c", PARENT, str(tmp_path), JOB], cwd=ROOT,
                            stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.monotonic() + 60
    while not all((tmp_path / f"job{i}").is_file() for i in range(2)):
        assert time.monotonic() < deadline and proc.poll() is None, "the jobs did not start"
        time.sleep(0.1)
    return proc


def wait_stopped(tmp_path, seconds: float = 30) -> bool:
    deadline = time.monotonic() + seconds
    while time.monotonic() < deadline:
        if all((tmp_path / f"job{i}.stopped").is_file() for i in range(2)):
            return True
        time.sleep(0.1)
    return False


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT])
def test_a_signal_to_the_parent_alone_stops_its_jobs_before_it_leaves(tmp_path, sig):
    proc = start_parent(tmp_path)
    os.kill(proc.pid, sig)            # the parent only, as `kill PID` or a scheduler that signals one process
    proc.wait(timeout=60)
    assert proc.returncode != 0
    assert all((tmp_path / f"job{i}.stopped").is_file() for i in range(2))   # stopped before the parent left


@pytest.mark.skipif(not sys.platform.startswith("linux"), reason="the parent-death signal is Linux's")
def test_a_sigkilled_parent_leaves_no_job_training(tmp_path):
    proc = start_parent(tmp_path)
    proc.kill()
    proc.wait(timeout=60)
    assert wait_stopped(tmp_path), "a job outlived its SIGKILLed parent"
