
import re
import subprocess
import sys

import pytest
from click.testing import CliRunner

from cbd_cache.config import load_config
from cbd_cache.config.load import parse_value
from cbd_cache.errors import ConfigError
from cbd_cache.train.runs import student_run_name
from cli import main

from .conftest import ROOT, SMOKE, smoke_config


@pytest.mark.parametrize("name", ["fashion_mnist_lt", "smoke", "imagenet_lt", "inat18", "imagenet_lt_official",
                                  "inat18_official", "glyphs_lt", "cifar100_lt"])
def test_shipped_pipelines_load_and_validate(name):
    cfg = load_config(ROOT / "pipelines" / f"{name}.toml")
    assert cfg.pipeline.name == name and cfg.teachers


@pytest.mark.parametrize("name,epochs,wd", [("imagenet_lt", 90, 5e-4), ("inat18", 200, 2e-4)])
def test_paper_recipes(name, epochs, wd):
    cfg = load_config(ROOT / "pipelines" / f"{name}.toml")
    for t in [*cfg.teachers, cfg.student]:
        assert (t.arch, t.epochs, t.batch_size, t.lr, t.weight_decay) == ("resnet50", epochs, 256, 0.2, wd)
    assert [t.type for t in cfg.teachers] == ["standard", "standard", "data_aug", "data_aug"]
    assert (cfg.student.alpha, cfg.student.beta, cfg.views.image_px) == (0.4, 100.0, 224)


def test_the_keys_outside_scripts_rely_on_can_be_set():
    cfg = smoke_config("data.root=/tmp", "data.seed=3", "export.views=4", "student.alpha=0.2", "student.beta=10",
                       "student.teachers=[aug0]", "student.epochs=7")
    assert (cfg.data.root, cfg.data.seed, cfg.export.views) == ("/tmp", 3, 4)
    assert (cfg.student.alpha, cfg.student.beta, cfg.student.teachers, cfg.student.epochs) == (0.2, 10.0, ["aug0"], 7)


def test_teacher_overrides_apply_to_all_or_one():
    cfg = smoke_config("teacher.epochs=5", "teachers.aug0.lr=0.3")
    assert [t.epochs for t in cfg.teachers] == [5, 5]
    assert [t.lr for t in cfg.teachers] == [0.05, 0.3]


def test_parse_value():
    assert parse_value("0.2") == 0.2 and parse_value("3") == 3 and parse_value("true") is True
    assert parse_value("[std0,aug0]") == ["std0", "aug0"] and parse_value('["a", "b"]') == ["a", "b"]
    assert parse_value("/some/path") == "/some/path"


@pytest.mark.parametrize("override,message", [
    ("student.alfa=0.2", "unknown config key 'student.alfa' (did you mean 'alpha'?)"),
    ("studnet.alpha=0.2", "no section 'studnet'"),
    ("student.alpha=1.5", "student.alpha=1.5: must be in [0, 1]"),
    ("student.alpha=abc", "student.alpha='abc': expected a number"),
    ("student.teachers=[ghost]", "student.teachers: no teacher named 'ghost'"),
    ("export.views=0", "export.views=0: must be in [1, 1024]"),
    ("teachers.nobody.lr=1", "no teacher named 'nobody'"),
    ("data.format=csv", "data.format='csv': must be one of"),
    ("export.min_views=0", "export.min_views=0: must be >= 1"),
    ("export.allocation=draw", "export.allocation='draw': must be one of uniform, draws"),
    ("data.profile=imagenet_lt_shape", "data.n_max=64 must be > 101"),   # the smoke's 64 -> 4 has no many-shot class
    # your own teachers (tests/test_imported.py)
    ("teacher.arch=timm:hf-hub:org/model", "hf-hub: names fetch weights or configs at run time"),
    ("teacher.source=elsewhere", "teacher.source='elsewhere': must be one of trained, imported"),
    ("teacher.mean=[0.5,0.5]", "give both, one value per channel"),
])
def test_bad_overrides_raise_one_line_naming_the_key(override, message):
    with pytest.raises(ConfigError) as e:
        smoke_config(override)
    assert message in str(e.value) and "\n" not in str(e.value)


@pytest.mark.parametrize("args,message", [
    (["--set", "student.alpha=1.5"], "student.alpha=1.5: must be in [0, 1]"),
    (["--set", "student.alfa=0.2"], "unknown config key 'student.alfa'"),
    (["--set", "noequals"], "expected key=value"),
    (["--pipeline", "pipelines/missing.toml"], "--pipeline pipelines/missing.toml: no such file"),
])
def test_cli_exits_2_with_one_line_and_writes_nothing(tmp_path, args, message):
    workdir = tmp_path / "wd"
    pipeline = [] if "--pipeline" in args else ["--pipeline", str(SMOKE)]
    result = CliRunner().invoke(main, ["prepare", *pipeline, "--workdir", str(workdir), *args])
    assert result.exit_code == 2
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], result.stderr
    assert not workdir.exists()


def test_missing_data_root_exits_2_and_writes_nothing(tmp_path):
    workdir = tmp_path / "wd"
    result = CliRunner().invoke(main, ["prepare", "--workdir", str(workdir), "--set", f"data.root={tmp_path}/nope"])
    assert result.exit_code == 2
    assert "data.root=" in result.stderr and "no such directory" in result.stderr
    assert not workdir.exists()


@pytest.mark.parametrize("item", ["student.beta=inf", "student.temperature=nan", "teacher.weight_decay=inf",
                                  "views.ratio=[0.5,inf]", "data.imbalance_factor=inf"])
def test_float_settings_must_be_finite(item):
    with pytest.raises(ConfigError, match=f"^{re.escape(item.split('=')[0])}=.*must be a finite number$"):
        smoke_config(item)


def test_student_run_names_follow_the_overrides():
    assert student_run_name(smoke_config()) == "student"
    assert student_run_name(smoke_config("student.alpha=0.2", "data.seed=1")) == "student_alpha=0.2_data.seed=1"
    assert student_run_name(smoke_config("views.image_px=32")) == "student_views.image_px=32"
    assert student_run_name(smoke_config("export.views=4", "student.seed=2")) == "student_export.views=4_seed=2"
    # a teacher-section change that every teacher used took is named once; one teacher's by its own key
    assert student_run_name(smoke_config("teacher.epochs=3")) == "student_teacher.epochs=3"
    assert student_run_name(smoke_config("teachers.aug0.epochs=3")) == "student_teachers.aug0.epochs=3"
    # what the run does not use is not in its name: the cache and teachers for cross-entropy, the location of data
    assert student_run_name(smoke_config("student.targets=none", "export.views=4", "teacher.epochs=3",
                                         "data.root=/x", "eval.batch_size=8")) == "student_targets=none"
    assert student_run_name(smoke_config("student.teachers=[std0]", "teachers.aug0.epochs=3")) == \
        "student_teachers=std0"
    assert student_run_name(smoke_config("student.teachers=[std0,aug0]")) == "student_teachers=std0+aug0"
    assert student_run_name(smoke_config("student.alpha=0.2", "student.name=mine")) == "mine"


def test_loading_a_pipeline_imports_no_torch():
    """A TOML is checked (and a typo refused) in milliseconds, on a machine or job without torch."""
    code = ("import sys; import cbd_cache.config as c; c.load_config(sys.argv[1], ['student.alpha=0.2']); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in ('torch', 'torchvision', 'timm')))")
    for name in ("smoke", "fashion_mnist_lt", "imagenet_lt"):
        out = subprocess.run([sys.executable, "-c", code, str(ROOT / "pipelines" / f"{name}.toml")], cwd=ROOT,
                             capture_output=True, text=True, check=True).stdout
        assert out.strip() == "[]", f"{name}: loading it imported {out.strip()}"
