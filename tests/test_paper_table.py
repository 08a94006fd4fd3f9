"""The paper table: its runs, the dedup between sections, and the Markdown / JSON / PNG it writes."""
import re
import shutil
from pathlib import Path

import numpy as np
import pytest

from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import read_labels
from cbd_cache.experiments.paper_design import (
    SECTION_KEYS,
    SEEDS,
    UPPER_EXTRACTOR,
    all_runs,
    export_steps,
    fifth_teacher,
    needs_student,
    sections,
    teacher_mixes,
    training_order,
    upper_bound_sets,
)
from cbd_cache.experiments.paper_report import write_paper_table
from cbd_cache.experiments.paper_table import Timing
from cbd_cache.system.storage import read_json, write_json
from cbd_cache.train.calibration import calibration_report
from cbd_cache.workdir import Workdir, kept_features

from .conftest import ROOT, SMOKE

FMNIST = ROOT / "pipelines" / "fashion_mnist_lt.toml"


def test_teacher_mixes_follow_the_paper_table_1():
    """K = 1 (std / aug), K = 2 (2 std / 2 aug / 1 + 1), K = 3 (1 std + 2 aug), K = 4 (2 + 2), K = 5 (2 + 3)."""
    cfg = load_config(FMNIST)
    fifth = fifth_teacher(cfg)
    assert fifth == ('teachers.aug2={type = "data_aug", seed = 5}',)
    full = load_config(FMNIST, fifth)
    assert [(t.name, t.type, t.seed) for t in full.teachers][-1] == ("aug2", "data_aug", 5)
    assert [m.teachers for m in teacher_mixes(full)] == [
        ("std0",), ("aug0",), ("std0", "std1"), ("aug0", "aug1"), ("std0", "aug0"), ("std0", "aug0", "aug1"),
        ("std0", "std1", "aug0", "aug1"), ("std0", "std1", "aug0", "aug1", "aug2")]
    assert [m.composition for m in teacher_mixes(full)][-3:] == [
        "1 standard + 2 data-aug", "2 standard + 2 data-aug", "2 standard + 3 data-aug"]
    assert teacher_mixes(cfg)[-1].teachers is None            # without the fifth teacher K = 5 cannot run
    # smoke: 1 std + 1 aug, and a student distilling every teacher: no teacher is added, 3 rows run
    smoke = load_config(SMOKE)
    assert fifth_teacher(smoke) == ()
    assert [m.teachers for m in teacher_mixes(smoke) if m.teachers] == [("std0",), ("aug0",), ("std0", "aug0")]


def test_paper_table_sections_run_table_1_and_the_data_aug_baselines():
    cfg = load_config(FMNIST)
    base = ("export.views=16", "export.logits=true", "student.views=8", *fifth_teacher(cfg))
    full = load_config(FMNIST, base)
    points = {s.key: dict(s.points) for s in sections(full, Path("W"))}
    assert points["mix"]["std0+aug0+aug1"] == ("student.teachers=[std0,aug0,aug1]",)
    assert points["mix"]["std0+std1+aug0+aug1"] == ()           # the default student: the CBD_ENS run
    assert points["mix"]["std0+std1+aug0+aug1+aug2"] == ("student.teachers=[std0,std1,aug0,aug1,aug2]",)
    assert points["table2"]["CBD_ENS"] == () and len(points["mix"]) == 8
    assert points["table2"]["Fine-tuning (data-aug)"] == (
        "student.targets=none", "student.lr=0.01", "student.epochs=10", "student.init=teachers/aug0")
    assert points["table2"]["cRT (data-aug)"] == (
        "student.targets=none", "student.classifier_only=true", "student.epochs=10", "student.init=teachers/aug0")
    assert "student.epochs=10" in points["table2"]["cRT"]
    runs = all_runs(full, base, Path("W"))
    for k in ("table2", "mix"):                                  # every row and seed loads, validates and is named
        assert {r.seed for r in runs[k]} == set(SEEDS)
    names = {(r.label, r.seed): r.name for r in runs["mix"]}
    k5 = names[("std0+std1+aug0+aug1+aug2", 0)]     # the fifth teacher's whole entry is a setting: a long name
    assert k5.startswith("student_teachers=std0+std1+aug0+aug1+aug2_views=8_") and len(k5) <= 180


def test_table_1_k5_adds_the_fifth_teacher_to_the_one_cache():
    """The K = 5 row's teacher is a group added to the cache of the other rows (only it runs), not a second
    export; the view study's other allocation exports only the teachers its runs distil."""
    cfg = load_config(FMNIST)
    base = ("export.views=16", "export.logits=true", "student.views=8", *fifth_teacher(cfg))
    full = load_config(FMNIST, base)
    own = [t.name for t in cfg.teachers]
    steps = export_steps(full, Path("W"), own, SECTION_KEYS)
    assert [(s.label, s.sets, s.teachers) for s in steps] == [
        ("export", (), ("std0", "std1", "aug0", "aug1")),
        ("export aug2 (added for Table 1, K = 5)", (), ("aug2",)),
        ("export uniform", ("export.allocation=uniform", "pipeline.cache_url=W/cache_uniform.zarr"),
         ("std0", "std1", "aug0", "aug1"))]
    k5 = {s.key: dict(s.points) for s in sections(full, Path("W"))}["mix"]["std0+std1+aug0+aug1+aug2"]
    assert not any(o.startswith("pipeline.cache_url") for o in (*base, *k5))     # ...and its runs read that cache
    assert [s.label for s in export_steps(full, Path("W"), own, ["table2", "alpha"])] == ["export"]
    smoke = load_config(SMOKE)
    assert [s.teachers for s in export_steps(smoke, Path("W"), ["std0", "aug0"], SECTION_KEYS)] == [
        ("std0", "aug0"), ("std0", "aug0")]                          # smoke: no fifth teacher; draws' own cache


def test_one_run_serves_every_table_that_asks_for_the_same_config():
    base = ("export.views=16", "export.logits=true", "student.views=8", *fifth_teacher(load_config(FMNIST)))
    runs = all_runs(load_config(FMNIST, base), base, Path("W"))
    name = {(k, r.label, r.seed): r.name for k, rs in runs.items() for r in rs}
    for seed in SEEDS:
        assert name[("table2", "CBD", seed)] == name[("alpha", "feature, alpha=0.4", seed)] == \
            name[("mix", "std0", seed)]
        # the pipeline's own allocation (draws) is CBD_ENS's cache; the other reads its own, under its own name
        assert name[("table2", "CBD_ENS", seed)] == name[("views", "draws A=8", seed)] == \
            name[("mix", "std0+std1+aug0+aug1", seed)]
        uniform = next(r for r in runs["views"] if r.label == "uniform A=8" and r.seed == seed)
        assert "export.allocation=uniform" in uniform.name and uniform.name != name[("views", "draws A=8", seed)]
        assert "pipeline.cache_url=W/cache_uniform.zarr" in uniform.overrides
    order = training_order(runs)
    # 78 before Table 1 had the paper's K = 3 and K = 5 rows (one K = 3 mix replaced, K = 5 added) and
    # the two data-augmentation baselines (+ 3 x 3 seeds), and before the view study's allocations and
    # fidelity rows (+ 7 x 3 seeds), Table 4 (+ 5 x 3: linear-head Standard-Instance, tau-norm, LWS, logit
    # adjustment, Balanced Softmax) and the controls (+ 3 x 3 and the upper bound's one extractor)
    assert len({r.name for r in order}) == 78 + 3 * 3 + 7 * 3 + 5 * 3 + 3 * 3 + 1 and order[0].label == "Standard-Instance"
    # rows from another row's model start from its run of the same seed: tau-norm and logit adjustment from
    # Standard-Instance (linear head for tau-norm); the upper bound from its one extractor, on all 60,000 images
    name = {(r.label, r.seed): r for k in ("table4", "controls") for r in runs[k]}
    for seed in SEEDS:
        assert f"student.init=students/{name[('Standard-Instance (linear head)', seed)].name}" in \
            name[("τ-norm", seed)].overrides
        assert f"student.init=students/{name[('Standard-Instance', seed)].name}" in name[("Logit Adjustment", seed)].overrides
        assert f"student.init=students/{name[(UPPER_EXTRACTOR, 0)].name}" in name[("Upper bound", seed)].overrides
        assert "student.epochs=40" in name[("Standard-Instance, 2x epochs", seed)].overrides
        assert "student.epochs=20" in name[("cRT, the student's epochs", seed)].overrides
    extractor = name[(UPPER_EXTRACTOR, 0)]
    assert [r.seed for r in runs["controls"] if r.label == UPPER_EXTRACTOR] == [0]
    assert {"data.profile=none", "pipeline.data_url=W/data_full"} <= set(extractor.overrides)
    assert needs_student(name[("Upper bound", 1)]) and not needs_student(extractor)
    assert {r.label for r in training_order(runs) if needs_student(r)} == {"τ-norm", "Logit Adjustment", "Upper bound"}
    other = load_config(FMNIST, ["data.format=imagefolder", "data.profile=none"])     # no full balanced set
    assert upper_bound_sets(other, Path("W")) is None
    assert "Upper bound" not in dict(next(s for s in sections(other, Path("W")) if s.key == "controls").points)


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
        conf = np.random.default_rng(r.seed).uniform(0.2, 1, 200)
        write_json(wd.student_dir(r.name) / "eval.json",
                   {"top1": acc, "many": None, "medium": acc, "few": acc - 10, "per_class": [acc] * 10,
                    "train_counts": [64, 47, 34, 25, 18, 13, 10, 7, 5, 4],
                    **calibration_report(conf, conf > 0.5 + 0.1 * r.seed),
                    **({"selection": {"tau": 0.1 * (r.seed + 1)}} if r.label in ("τ-norm", "Logit Adjustment") else {})})
    ncm = [{"label": m, "runs": [], "complete": True,
            **{k: {"mean": v, "std": 0.0, "n": 3, "values": []} for k in ("top1", "medium", "few")},
            "many": {"mean": None, "std": None, "n": 0, "values": []}}
           for m, v in (("Standard-Instance", 30.0), ("CBD", 35.0))]
    timing = Timing(wd.root / "t.json", {"options": "--jobs 2 --time-limit-min 50", "device": "cpu"})
    timing.record("student x", 90.0)
    timing.record("student x", 80.0)        # a later chunk that only skipped it does not count
    md = write_paper_table(cfg, base, wd, runs, ncm, timing, tmp_path / "out", True)
    text = md.read_text()
    assert "- CBD_ENS > CBD > cRT > Standard-Instance (top-1, mean of 3 seeds): holds (CBD_ENS 71.00, CBD 61.00" in text
    assert "feature >= logit distillation at alpha = 0.4: holds (feature 61.00, logit 56.00)" in text
    assert "NCM on CBD features > NCM on Standard-Instance features: holds" in text
    assert "| cRT | `targets=none` `classifier_only=true` `epochs=10` `init=teachers/std0` | 51.0 ± 1.0 |" in text
    assert "| cRT (data-aug) | `targets=none` `classifier_only=true` `epochs=10` `init=teachers/aug0` | 46.0 ± 1.0 |" in text
    # Table 1: every paper row, run or said why not (smoke has 1 standard + 1 data-aug teacher)
    assert "| 2 | 1 standard + 1 data-aug | std0+aug0 | (defaults) | 71.0 ± 1.0 |" in text
    assert "| 1 | 1 standard | std0 | `teachers=[std0]` | 61.0 ± 1.0 |" in text
    for row in ("| 2 | 2 standard |", "| 3 | 1 standard + 2 data-aug |", "| 5 | 2 standard + 3 data-aug |"):
        assert f"{row} – | not run: the pipeline has 1 standard and 1 data-aug teachers |" in text
    assert ("draws allocation at A = 8, within 0.5 top-1 points of online: holds "
            "(draws A=8 71.20, uniform A=8 71.00, online 71.50)") in text
    assert "draws A = 8 cache bytes within 5% of the uniform A = 8 cache: " in text     # smoke: tiny shards pad more
    assert "fidelity, uniform A = 8: cached targets train like the teachers run on the same views " \
           "(within 1 point, seed noise): holds (cache 71.00, teachers on the stored views 71.40)" in text
    assert "| draws | 8 | 71.20 ± 1.00 |" in text
    assert "Work: **1m30s**" in text
    assert re.search(r"Ran on .+ cores, GPU .+, torch .+ \(cpu\) in 1 invocation \(\d{4}-\d\d-\d\d \d\d:\d\d UTC at "
                     r"commit `[^`]+`, `--jobs 2 --time-limit-min 50`: \d+s\): \*\*\d+s wall\*\* in all\.", text), text
    # Table 4, the controls, the upper bound (smoke's synthetic source is a whole balanced set, cut), calibration
    assert "| LWS | `targets=none` `rebalance=lws` `epochs=10` `init=teachers/std0` | 46.0 ± 1.0 |" in text
    assert "| τ-norm | `targets=none` `rebalance=tau_norm` `init=@Standard-Instance (linear head)` | 46.0 ± 1.0 |" in text
    assert "| 0.1, 0.2, 0.3 | – |" in text                                       # tau chosen on val, per seed
    assert "| Upper bound | `targets=none` `classifier_only=true` `epochs=10` `init=@Upper bound: feature extractor" in text
    assert "| 3 | 73.5 |" in text and "| Standard-Instance, 2x epochs | `targets=none` `sampling=instance` `epochs=4`" in text
    assert "- CBD > LWS, cRT and Logit Adjustment (the paper's Table 4): holds (CBD 61.00, LWS 46.00, cRT 51.00" in text
    assert "- CBD_ENS < the upper bound (features learnt from the whole balanced training set): **does not hold**" in text
    assert "## Summary and checks (the README's results table)" in text and "| Balanced Softmax | 46.0 ± 1.0 |" in text
    assert "tau is chosen on the val split** (10 per class held out of the source's training images" in text
    assert "| LWS | 46.0 ± 1.0 | – | 46.0 | 36.0 |" in text              # the summary: means, NCM where run
    assert "not drawn yet: the NCM pass of Standard-Instance and CBD_ENS (seed 0) has not run" in text
    for png in ("smoke_alpha.png", "smoke_views.png", "smoke_per_class.png", "smoke_reliability.png"):
        assert (tmp_path / "out" / png).stat().st_size > 5000, png
    assert (tmp_path / "out" / "smoke.json").is_file()


@pytest.mark.slow
def test_figures_1_and_4_are_drawn_from_the_features_ncm_kept(smoke_workdir, tmp_path):
    """From the kept features of Standard-Instance and CBD_ENS (seed 0) and the shards' images; the test images
    are drawn at random with a seed, 4 of them from few-shot classes, and each gets its 5 nearest training images."""
    from cbd_cache.data.longtail import shot_group
    from cbd_cache.experiments.paper_comparison import draw_figures, figure_runs
    from cbd_cache.experiments.paper_figures import nearest, pick_queries

    wd = Workdir(tmp_path / "wd")
    shutil.copytree(smoke_workdir.data, wd.data)
    base = ("export.views=16", "export.logits=true", "student.views=8")
    runs = all_runs(load_config(SMOKE, base), base, wd.root)
    manifest, rng = Manifest.load(wd.manifest), np.random.default_rng(0)
    assert "not drawn yet" in draw_figures(wd, manifest, runs, 0, tmp_path / "f1.png", tmp_path / "f4.png")
    for r in figure_runs(runs).values():
        arrays = {}
        for split in manifest.splits:
            y = read_labels(manifest, split)
            arrays[f"{split}_features"] = (np.eye(10)[y] + rng.normal(0, 0.3, (len(y), 10))).astype(np.float16)
            arrays[f"{split}_labels"] = y
        wd.student_dir(r.name).mkdir(parents=True)
        np.savez(kept_features(wd.student_dir(r.name)), key="{}", **arrays)
    assert draw_figures(wd, manifest, runs, 0, tmp_path / "f1.png", tmp_path / "f4.png") is None
    assert (tmp_path / "f1.png").stat().st_size > 20000 and (tmp_path / "f4.png").stat().st_size > 20000
    test_labels, counts = read_labels(manifest, "test"), manifest.train.class_counts
    queries = pick_queries(test_labels, counts, 0)
    assert len(set(queries)) == 8 and queries == pick_queries(test_labels, counts, 0)
    assert [shot_group(counts[test_labels[q]]) == "few" for q in queries] == [True] * 4 + [False] * 4
    train = np.eye(10)[read_labels(manifest, "train")]
    assert (read_labels(manifest, "train")[nearest(train, np.eye(10)[test_labels[queries]])] ==
            test_labels[queries][:, None]).all()       # clean features: every neighbour of its own class


def test_hanzi_class_names_are_drawn_in_an_installed_cjk_face(tmp_path):
    """The glyph source's class names ("U+5415 吕") must not come out as empty boxes (DejaVu Sans has no hanzi)."""
    import warnings

    from cbd_cache.experiments.paper_figures import plot_figure1, plot_figure4, text_fonts

    if len(text_fonts()["font.family"]) < 2:
        pytest.skip("no CJK font installed (`make data` installs them)")
    names, counts = ["U+5415 吕", "U+4E00 一", "U+4EBA 人", "U+5927 大", "U+5C0F 小", "U+5C71 山", "U+6C34 水"], \
        [100, 60, 30, 15, 8, 4, 2]
    labels = np.repeat(np.arange(7), 3)
    features = np.eye(7)[labels] + np.random.default_rng(0).normal(0, 0.1, (21, 7))
    image = np.zeros((1, 28, 28), np.uint8)
    with warnings.catch_warnings():
        warnings.filterwarnings("error", message=r"Glyph \d+ .*missing from")   # matplotlib, for each box drawn
        plot_figure1(counts, names, [("Instance", features, labels)], "val", tmp_path / "f1.png")
        plot_figure4([(image, 0), (image, 6)], [("Instance", [[(image, 1)], [(image, 6)]])], names, counts,
                     tmp_path / "f4.png")
    assert (tmp_path / "f1.png").stat().st_size > 5000


def test_per_class_plot_groups_classes_by_count_and_bins_many_counts_on_a_log_scale():
    from cbd_cache.experiments.paper_plots import count_bins

    assert count_bins([5, 9, 5, 1280]) == [[0, 2], [1], [3]]         # few counts: one point per count
    counts = [*range(1, 151), *[1] * 50]                              # 200 glyph classes, 150 distinct counts
    groups = count_bins(counts)
    assert 6 <= len(groups) <= 12
    assert sorted(c for g in groups for c in g) == list(range(200))  # every class in exactly one point
    spans = [(min(counts[c] for c in g), max(counts[c] for c in g)) for g in groups]
    assert all(hi < lo for (_, hi), (lo, _) in zip(spans, spans[1:]))  # bins of increasing, disjoint counts
    assert spans[0] == (1, 1) and spans[-1][1] == 150


def test_timing_keeps_each_invocation_and_reads_a_file_from_before_they_were_recorded(tmp_path):
    path = tmp_path / "paper_table_timing.json"
    write_json(path, {"prepare": 5.0, "student a": 100.0})            # the old layout: steps only
    first = Timing(path, {"options": "--jobs 2 --time-limit-min 50", "device": "cpu"})
    first.record("student b", 60.0)
    first.chunk["wall_s"] = 3000.0                                    # as if it had run 50 min
    write_json(path, first.data)
    second = Timing(path, {"options": "--jobs 2 --time-limit-min 0", "device": "cuda"})
    second.record("student b", 10.0)                                  # skipped now: the longer time stays
    data = read_json(path)
    assert data["steps"] == {"prepare": 5.0, "student a": 100.0, "student b": 60.0}
    assert [c["options"] for c in data["chunks"]] == ["--jobs 2 --time-limit-min 50", "--jobs 2 --time-limit-min 0"]
    assert data["chunks"][1]["wall_s"] < 60 and data["chunks"][1]["commit"]
    text = second.chunks_text()
    assert text.startswith("Ran in 2 invocations (") and "(cuda), `--jobs 2 --time-limit-min 0`" in text   # 2 devices
    assert "**50m" in text and text.endswith("not counting the ones before invocations were recorded.")
    assert Timing(tmp_path / "none.json").chunks_text().startswith("Its invocations were not recorded")
