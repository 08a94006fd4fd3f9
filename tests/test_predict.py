import csv
import io

import numpy as np
from click.testing import CliRunner

from cbd_cache.data.manifest import Manifest
from cbd_cache.data.shards import read_shard
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.system.runtime import make_runtime
from cbd_cache.train.evaluation import eval_loader, predict
from cbd_cache.views import ViewSpec
from cli import main

from .conftest import SMOKE, smoke_config


def test_predict_a_folder_with_bad_files_gives_one_row_per_image_and_evaluates_as_evaluate_does(smoke_workdir, tmp_path):
    manifest = Manifest.load(smoke_workdir.manifest)
    info = manifest.splits["test"].shards[0]
    samples = read_shard(manifest.shard_path(info), info.start, info.stop)[:12]
    folder = tmp_path / "images"
    (folder / "sub").mkdir(parents=True)
    for i, s in enumerate(samples):
        (folder / ("sub" if i % 2 else ".") / f"{s.row:04d}.{s.ext}").write_bytes(s.data)
    (folder / "broken.png").write_bytes(samples[0].data[:len(samples[0].data) // 2])   # truncated
    (folder / "empty.jpg").write_bytes(b"")
    (folder / "notes.md").write_text("not an image: a folder lists image files only")
    (tmp_path / "list.txt").write_text(f"images/sub/{samples[1].row:04d}.{samples[1].ext}\nimages/missing.png\n")

    result = CliRunner().invoke(main, ["predict", "--pipeline", str(SMOKE), "--workdir", str(smoke_workdir.root),
                                       "--run", "teachers/std0", "--top-k", "3", str(folder), str(tmp_path / "list.txt")])
    assert result.exit_code == 0, result.output
    rows = list(csv.DictReader(io.StringIO(result.stdout)))
    assert len(rows) == 12 + 2 + 2                                         # one row per image (+ the list's two)
    assert list(rows[0]) == ["path", "error", "class_1", "score_1", "class_2", "score_2", "class_3", "score_3"]
    errors = {r["path"].rsplit("/", 1)[1]: r["error"] for r in rows if r["error"]}
    assert set(errors) == {"broken.png", "empty.jpg", "missing.png"}
    assert "cannot decode" in errors["broken.png"] and errors["empty.jpg"] == "zero bytes"
    assert all(r["class_1"] == "" for r in rows if r["error"])

    # the top class is evaluate's prediction for the same image; scores are probabilities, best first
    cfg = smoke_config()
    runtime = make_runtime(cfg.pipeline)
    net, _ = load_checkpoint(smoke_workdir.teacher_checkpoint("std0"))
    out = predict(net, eval_loader(manifest, "test", ViewSpec.from_cfg(cfg.views), 64, runtime), runtime)
    good = [r for r in rows if not r["error"]]
    assert len(good) == 13
    for r in good:
        row = int(r["path"].rsplit("/", 1)[1].split(".")[0])
        assert r["class_1"] == manifest.class_names[out["preds"][row]]
        scores = [float(r[f"score_{i}"]) for i in (1, 2, 3)]
        assert scores == sorted(scores, reverse=True) and 0 < sum(scores) <= 1 + 1e-5
    assert np.isfinite([float(r["score_1"]) for r in good]).all()


def test_predict_refuses_an_unknown_run_in_one_line(smoke_workdir, tmp_path):
    result = CliRunner().invoke(main, ["predict", "--pipeline", str(SMOKE), "--workdir", str(smoke_workdir.root),
                                       "--run", "students/nope", str(tmp_path)])
    assert result.exit_code == 2 and "--run students/nope: no checkpoint" in result.output
