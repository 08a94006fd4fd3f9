"""The README's config reference names every config field, so the two cannot drift apart silently."""
import dataclasses
from cbd_cache.config import Config, TrainCfg

from .conftest import ROOT


def test_readme_config_reference_names_every_field():
    readme = (ROOT / "README.md").read_text()
    reference = readme[readme.index("## Configuration reference"):]
    missing = []
    for section in ("pipeline", "data", "views", "teacher", "export", "student", "eval"):
        cls = type(getattr(Config(), section))
        for f in dataclasses.fields(cls):
            if section == "student" and f.name in {x.name for x in dataclasses.fields(TrainCfg)}:
                assert f"`{f.name}`" in reference    # listed once under "student.* training fields"
                continue
            if f"`{section}.{f.name}`" not in reference:
                missing.append(f"{section}.{f.name}")
    assert not missing, f"README config reference lacks {missing}"
