"""Shared fixtures: the smoke pipeline, prepared, with teachers trained and the cache exported, once per session."""
from __future__ import annotations

import shutil
from pathlib import Path

import pytest

from cbd_cache import pipeline
from cbd_cache.config import load_config
from cbd_cache.system.runtime import make_runtime
from cbd_cache.workdir import Workdir

ROOT = Path(__file__).resolve().parents[1]
SMOKE = ROOT / "pipelines" / "smoke.toml"


def smoke_config(*overrides: str):
    return load_config(SMOKE, overrides)


@pytest.fixture(scope="session")
def smoke_workdir(tmp_path_factory) -> Workdir:
    """A finished smoke workdir up to the cache (prepare, 2 teachers, export), made as `cbd-cache run` makes
    it (through the one orchestrator). Tests must not modify it."""
    cfg = smoke_config()
    wd = Workdir(tmp_path_factory.mktemp("smoke"))
    runtime = make_runtime(cfg.pipeline)
    pipeline.prepare_data(cfg, wd, runtime)
    pipeline.train_teachers(cfg, wd, runtime)
    pipeline.export(cfg, wd, runtime)
    return wd


@pytest.fixture
def smoke_copy(smoke_workdir, tmp_path) -> Workdir:
    """A private copy of the smoke workdir that a test may change."""
    dst = tmp_path / "wd"
    shutil.copytree(smoke_workdir.root, dst)
    return Workdir(dst)
