import json
import os
import re
import subprocess
import sys

import pytest
import torch
from click.testing import CliRunner

from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.loaders import EvalStream
from cbd_cache.models.checkpoints import load_checkpoint, network_spec, save_checkpoint
from cbd_cache.models.networks import Network
from cbd_cache.pipeline import train_student
from cbd_cache.system.runtime import make_runtime, to_unit
from cbd_cache.tools.portable import portable_name
from cbd_cache.views import ViewSpec
from cli import main

from .conftest import ROOT, SMOKE

# the snippet runs where cbd_cache cannot be imported, then reports whether anything tried
RUN_SNIPPET = """
import sys
sys.modules["cbd_cache"] = None          # any `import cbd_cache...` now raises ImportError
{snippet}
model, cfg = load_student(sys.argv[1])
with torch.no_grad():
    torch.save(model(torch.load(sys.argv[2])), sys.argv[3])
"""


def readme_snippet() -> str:
    readme = (ROOT / "README.md").read_text()
    section = readme[readme.index("## Use the student"):]
    return re.search(r"```python\n(.*?)```", section, re.S).group(1)


def test_names_map_to_a_plain_network():
    assert portable_name("backbone.layer1.0.conv1.weight") == "layer1.0.conv1.weight"
    assert portable_name("projection.0.weight") == "fc.projection.0.weight"
    assert portable_name("classifier.weight") == "fc.weight"
    assert portable_name("classifier.bias") == "fc.bias"          # an imported teacher's own Linear fc


@pytest.mark.slow
def test_the_readme_snippet_loads_the_exported_student_without_cbd_cache_and_gives_its_logits(smoke_copy, tmp_path):
    cfg = load_config(SMOKE, ["student.epochs=1", "student.name=portable"])
    train_student(cfg, smoke_copy, make_runtime(cfg.pipeline))          # K = 2: a small ResNet with a projection
    manifest = Manifest.load(smoke_copy.manifest)
    # and a torchvision ResNet without one, with BatchNorm statistics that are not the defaults
    torch.manual_seed(0)
    rn18 = Network("resnet18", manifest.channels, manifest.num_classes, 16.0)
    for m in rn18.modules():
        if isinstance(m, torch.nn.BatchNorm2d):
            m.running_mean.uniform_(-0.2, 0.2), m.running_var.uniform_(0.5, 2.0), m.weight.data.uniform_(0.5, 1.5)
    save_checkpoint(smoke_copy.student_dir("rn18") / "checkpoint.pt", rn18,
                    network_spec(rn18, "resnet18", manifest.channels, manifest.num_classes, 16.0), {"kind": "test"})
    # and an imported teacher: its own Linear fc (bias too) and its own input mean / std
    imported = Network("resnet18", manifest.channels, manifest.num_classes, 16.0, head="linear",
                       mean=[0.4] * manifest.channels, std=[0.2] * manifest.channels)
    torch.nn.init.uniform_(imported.classifier.bias, -1, 1)
    save_checkpoint(smoke_copy.teacher_dir("imp") / "checkpoint.pt", imported,
                    network_spec(imported, "resnet18", manifest.channels, manifest.num_classes, 16.0), {"kind": "test"})

    stream = EvalStream(manifest, "test", ViewSpec.from_cfg(cfg.views))
    x = to_unit(torch.stack([img for img, _, _ in list(stream)[:32]]))  # what evaluate feeds the network
    torch.save(x, tmp_path / "x.pt")
    script = tmp_path / "snippet.py"
    script.write_text(RUN_SNIPPET.format(snippet=readme_snippet()))
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    for run, family in (("students/portable", "small_resnet"), ("students/rn18", "torchvision"),
                        ("teachers/imp", "torchvision")):
        out = tmp_path / run
        result = CliRunner().invoke(main, ["export-model", "--pipeline", str(SMOKE), "--workdir", str(smoke_copy.root),
                                           "--run", run, str(out)])
        assert result.exit_code == 0, result.output
        info = json.loads((out / "model.json").read_text())
        assert info["family"] == family and info["class_names"] == manifest.class_names
        mean, std = ([0.4], [0.2]) if run == "teachers/imp" else ([0.0], [1.0])
        assert info["input"]["shape"] == [manifest.channels, 16, 16] and (info["input"]["mean"], info["input"]["std"]) \
            == (mean * manifest.channels, std * manifest.channels)
        assert info["classifier"] == ("linear" if run == "teachers/imp" else "cosine")
        torch.save((x - torch.tensor(mean).view(1, -1, 1, 1)) / torch.tensor(std).view(1, -1, 1, 1), tmp_path / "xn.pt")
        subprocess.run([sys.executable, str(script), str(out), str(tmp_path / "xn.pt"), str(tmp_path / "z.pt")],
                       cwd=tmp_path, env=env, check=True)
        net, _ = load_checkpoint(smoke_copy.root / run / "checkpoint.pt")
        with torch.no_grad():
            expected, _ = net.eval()(x)
        got = torch.load(tmp_path / "z.pt")
        assert got.shape == expected.shape and expected.abs().max() > 1
        assert (got - expected).abs().max() <= 1e-5
    assert info["projection_dim"] == 0
    assert json.loads((tmp_path / "students" / "portable" / "model.json").read_text())["projection_dim"] == 128
