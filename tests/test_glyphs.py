"""The glyph source: a pure function of its settings and fonts, never a face without the character."""
import shutil
from pathlib import Path

import pytest
from click.testing import CliRunner

from cbd_cache.config import load_config
from cbd_cache.data.prepare import prepare
from cbd_cache.data.sources import open_source
from cbd_cache.data.sources.glyphs import FONT_PACKAGES, MIN_FACES, font_files, gb2312_level1
from cbd_cache.errors import ConfigError
from cbd_cache.system.digests import file_sha256
from cbd_cache.workdir import Workdir
from cli import main

from .conftest import ROOT, SMOKE

FONTS = Path("/usr/share/fonts")
SMALL = ["data.format=glyphs", f"data.root={FONTS}", "data.num_classes=12", "data.n_max=8", "data.imbalance_factor=4",
         "data.test_per_class=2", "data.image_px=16", "data.shard_size=16", "pipeline.workers=0"]
needs_fonts = pytest.mark.skipif(not any("CJK" in p.name or "wqy" in p.name for p in font_files(FONTS))
                                 if FONTS.is_dir() else True,
                                 reason="no CJK fonts installed (`make data PIPELINE=pipelines/glyphs_lt.toml`)")


def test_gb2312_level1_is_the_3755_common_hanzi_in_code_order():
    chars = gb2312_level1()
    assert len(chars) == len(set(chars)) == 3755
    assert chars[0] == "啊" and chars[-1] == "座" and all("\u4e00" <= c <= "\u9fff" for c in chars)


@needs_fonts
def test_prepare_twice_gives_byte_identical_shards_and_names_its_fonts(tmp_path):
    cfg = load_config(SMOKE, SMALL)
    hashes = []
    for run in ("a", "b"):
        wd = Workdir(tmp_path / run)
        manifest = prepare(cfg, wd)
        hashes.append({p.name: file_sha256(p) for p in sorted(wd.data.glob("*.tar"))})
    assert hashes[0] == hashes[1] and {n.split("-")[0] for n in hashes[0]} == {"train", "val", "test"}
    assert manifest.train.class_counts[0] > 0 and set(manifest.splits["val"].class_counts) == {2}
    fonts = manifest.source["fonts"]
    assert fonts and all(len(f["sha256"]) == 64 and f["faces"] for f in fonts)
    assert manifest.source["fonts"][0]["sha256"] == file_sha256(Path(fonts[0]["file"]))


@needs_fonts
def test_a_face_without_the_character_is_never_used():
    """DejaVu has no hanzi and HanaMinB only the supplementary planes: neither draws a level-1 class."""
    source = open_source(load_config(SMOKE, SMALL).data)
    used = {Path(f).name for f, _ in source.faces}
    assert used and not any(n.startswith(("DejaVu", "HanaMinB")) for n in used)
    assert all(len(faces) >= MIN_FACES for faces in source.class_faces)
    img_a, _ = source.read(source.records("train")[0])
    img_b, _ = source.read(source.records("train")[0])
    assert img_a == img_b and source.read(source.records("test")[0])[0] != img_a


def test_missing_fonts_give_one_line_naming_the_apt_get_command(tmp_path):
    (tmp_path / "fonts").mkdir()
    for f in list(FONTS.rglob("DejaVuSans.ttf"))[:1]:
        shutil.copy(f, tmp_path / "fonts")
    with pytest.raises(ConfigError, match=r"glyphs needs 4; install the CJK fonts: sudo apt-get update && "
                                          r"sudo apt-get install fonts-noto-cjk"):
        open_source(load_config(SMOKE, [*SMALL, f"data.root={tmp_path / 'fonts'}"]).data)


@needs_fonts
def test_dry_run_prints_the_classes_faces_and_shot_groups(tmp_path):
    args = [x for o in [*SMALL, "data.num_classes=200", "data.n_max=300", "data.imbalance_factor=100"]
            for x in ("--set", o)]
    result = CliRunner().invoke(main, ["prepare", "--dry-run", "--pipeline", str(SMOKE),
                                       "--workdir", str(tmp_path / "wd"), *args])
    assert result.exit_code == 0, result.output
    out = result.stdout
    assert "images listed: train 60,000, val 400, test 400" in out
    assert "fonts: " in out and "distinct faces per class" in out and "classes: " in out
    assert "many-shot" in out and "few-shot" in out
    assert not (tmp_path / "wd").exists()


def test_the_makefile_installs_the_fonts_the_error_line_names():
    line = next(x for x in (ROOT / "Makefile").read_text().splitlines() if x.startswith("FONT_PACKAGES :="))
    assert line.split(":=", 1)[1].split() == FONT_PACKAGES.split()
