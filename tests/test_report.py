"""The paper table: its runs, the dedup between sections, and the Markdown / JSON / PNG it writes."""
import shutil
from pathlib import Path

from cbd_cache.config import load_config
from cbd_cache.report import SEEDS, Timing, all_runs, teacher_mixes, training_order, write_paper_table
from cbd_cache.workdir import Workdir, write_json

from .conftest import ROOT, SMOKE

FMNIST = ROOT / "pipelines" / "fashion_mnist_lt.toml"


def test_teacher_mixes_follow_the_paper_table_1():
    assert teacher_mixes(load_config(FMNIST)) == [["std0"], ["aug0"], ["std0", "std1"], ["aug0", "aug1"],
                                                  ["std0", "aug0"], ["std0", "std1", "aug0"], None]
    assert teacher_mixes(load_config(SMOKE)) == [["std0"], ["aug0"], None]


def test_one_run_serves_every_table_that_asks_for_the_same_config():
    base = ("export.views=16", "export.logits=true", "student.views=8")
    runs = all_runs(load_config(FMNIST, base), base, Path("W"))
    name = {(k, r.label, r.seed): r.name for k, rs in runs.items() for r in rs}
    for seed in SEEDS:
        assert name[("table2", "CBD", seed)] == name[("alpha", "feature, alpha=0.4", seed)] == \
            name[("mix", "std0", seed)]
        assert name[("table2", "CBD_ENS", seed)] == name[("views", "uniform A=8", seed)] == \
            name[("mix", "std0+std1+aug0+aug1", seed)]
        # the other allocation reads its own cache, under its own run name
        draws = next(r for r in runs["views"] if r.label == "draws A=8" and r.seed == seed)
        assert draws.name == f"student_allocation=draws_views=8_seed={seed}"
        assert "pipeline.cache_url=W/cache_draws.zarr" in draws.overrides
    order = training_order(runs)
    assert len({r.name for r in order}) == 99 and order[0].label == "Standard-Instance"


def test_write_paper_table_from_finished_runs(smoke_workdir, tmp_path):
    wd = Workdir(tmp_path / "wd")
    shutil.copytree(smoke_workdir.data, wd.data)
    base = ("export.views=16", "export.logits=true", "student.views=8")
    cfg = load_config(SMOKE)
    runs = all_runs(load_config(SMOKE, base), base, wd.root)
    top1 = {"Standard-Instance": 40, "cRT": 50, "CBD": 60, "CBD_ENS": 70, "logit, alpha=0.4": 55, "online": 70.5,
            "draws A=8": 70.2, "uniform A=8, teachers on the stored views": 70.4}
    written = set()
    for r in [r for rs in runs.values() for r in rs]:
        if r.name in written:              # a run shared by two sections keeps its first label's number
            continue
        written.add(r.name)
        acc = top1.get(r.label, 45) + r.seed
        write_json(wd.student_dir(r.name) / "eval.json",
                   {"top1": acc, "many": None, "medium": acc, "few": acc - 10, "per_class": [acc] * 10,
                    "train_counts": [64, 47, 34, 25, 18, 13, 10, 7, 5, 4]})
    ncm = [{"label": m, "runs": [], "complete": True,
            **{k: {"mean": v, "std": 0.0, "n": 3, "values": []} for k in ("top1", "medium", "few")},
            "many": {"mean": None, "std": None, "n": 0, "values": []}}
           for m, v in (("Standard-Instance", 30.0), ("CBD", 35.0))]
    timing = Timing(wd.root / "t.json")
    timing.record("student x", 90.0)
    timing.record("student x", 80.0)        # a later chunk that only skipped it does not count
    md = write_paper_table(cfg, base, wd, runs, ncm, timing, tmp_path / "out", True)
    text = md.read_text()
    assert "- CBD_ENS > CBD > cRT > Standard-Instance (top-1, mean of 3 seeds): holds (CBD_ENS 71.00, CBD 61.00" in text
    assert "feature >= logit distillation at alpha = 0.4: holds (feature 61.00, logit 56.00)" in text
    assert "NCM on CBD features > NCM on Standard-Instance features: holds" in text
    assert ("draws allocation at A = 8, within 0.5 top-1 points of online: holds "
            "(draws A=8 71.20, uniform A=8 71.00, online 71.50)") in text
    assert "draws A = 8 cache bytes within 5% of the uniform A = 8 cache: " in text     # smoke: tiny shards pad more
    assert "fidelity, uniform A = 8: cached targets train like the teachers run on the same views " \
           "(within 1 point, seed noise): holds (cache 71.00, teachers on the stored views 71.40)" in text
    assert "| draws | 8 | 71.20 ± 1.00 |" in text
    assert "| cRT | `targets=none` `init=teachers/std0` `classifier_only=true` | 51.0 ± 1.0 |" in text
    assert "**1m30s** of work" in text
    for png in ("smoke_alpha.png", "smoke_views.png", "smoke_per_class.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5000
    assert (tmp_path / "out" / "smoke.json").is_file()
