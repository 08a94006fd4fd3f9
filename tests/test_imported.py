"""Teachers and backbones brought from elsewhere: architectures by name, per-network input normalisation,
checkpoint layouts, class mapping, and an imported teacher exported, verified and distilled."""
import dataclasses
import importlib.util
import json
import socket

import numpy as np
import pytest
import torch
import torchvision
from click.testing import CliRunner

from cbd_cache.config import load_config
from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import ConfigError
from cbd_cache.config.archs import TORCHVISION, arch_error
from cbd_cache.models.checkpoints import load_checkpoint, network_spec, save_checkpoint
from cbd_cache.models.networks import Network, descriptor_dim
from cbd_cache.stages.imported import (
    chance_warning,
    checkpoint_class_names,
    class_order,
    load_backbone,
    load_file,
    read_state_dict,
    split_classifier,
)
from cbd_cache.stages.teachers import train_teacher
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.runtime import make_runtime
from cbd_cache.system.storage import read_json
from cli import main

from .conftest import SMOKE, smoke_config

IMAGENET = "mean = [0.485, 0.456, 0.406]\nstd = [0.229, 0.224, 0.225]\n"


def byo_pipeline(tmp_path, entry: str):
    """The smoke pipeline plus one more [[teachers]] entry."""
    path = tmp_path / "byo.toml"
    path.write_text(SMOKE.read_text() + "\n[[teachers]]\n" + entry)
    return path


def timm_installed() -> bool:
    """Whether timm can be imported, without importing it (seconds) before a test needs it."""
    try:
        return importlib.util.find_spec("timm") is not None
    except ValueError:   # sys.modules["timm"] = None: hidden on purpose
        return False


def cbd(*args):
    """(exit code, stdout + stderr) of the CLI, in process."""
    result = CliRunner().invoke(main, list(map(str, args)), prog_name="cbd-cache")
    return result.exit_code, result.output


def cbd_json(*args):
    result = CliRunner().invoke(main, list(map(str, args)), prog_name="cbd-cache")
    assert result.exit_code == 0, result.output
    return json.loads(result.stdout)


# ------------------------------------------------------------------------------- architectures by name
def test_the_named_torchvision_family_is_torchvisions_own():
    """config/archs.py names them without importing torch; torchvision must build exactly those."""
    import torchvision
    family = {m for m in torchvision.models.list_models(module=torchvision.models)
              if m.startswith(("resnet", "resnext", "wide_resnet"))}
    assert set(TORCHVISION) == family


@pytest.mark.parametrize("arch,ok", [("resnet8", True), ("resnext50_32x4d", True), ("wide_resnet50_2", True),
                                     ("resnet9", False), ("vgg16", False)])
def test_torchvision_resnet_family_by_name(arch, ok):
    assert (arch_error(arch) is None) == ok
    if not ok:
        with pytest.raises(ConfigError, match=f"arch='{arch}': must be one of resnet8, .*, resnet18, resnet34,") as e:
            load_config(SMOKE, [f"teacher.arch={arch}"])
        assert "\n" not in str(e.value)


def test_descriptor_sizes_by_name():
    assert [descriptor_dim(a) for a in ("resnet8", "resnet18", "resnext50_32x4d", "wide_resnet50_2")] == \
        [64, 512, 2048, 2048]


def test_no_model_is_built_with_downloaded_weights(monkeypatch):
    """Building any named architecture opens no connection (torchvision weights=None, timm pretrained=False)."""
    def no_network(*a, **k):
        raise AssertionError("a model tried to download something")

    monkeypatch.setattr(socket.socket, "connect", no_network)
    monkeypatch.setattr(torch.hub, "load_state_dict_from_url", no_network)
    for arch in ("resnet18", "resnext50_32x4d"):
        Network(arch, 3, 10, 20.0)
    try:
        import timm  # optional dependency: the timm half runs only where it is installed
    except ImportError:
        return
    monkeypatch.setattr(timm.models._builder, "load_pretrained", no_network)
    Network("timm:resnet18.a1_in1k", 3, 10, 20.0)


# ------------------------------------------------------------------------------- input normalisation
def test_the_network_normalises_its_input_and_its_checkpoint_keeps_head_and_normalisation(tmp_path):
    torch.manual_seed(0)
    x = torch.rand(2, 3, 16, 16)
    plain = Network("resnet8", 3, 10, 20.0).eval()
    assert plain.mean.flatten().tolist() == [0, 0, 0] and plain.std.flatten().tolist() == [1, 1, 1]
    assert torch.equal(plain.features(x), plain.backbone(x))            # built-ins: pixels in [0, 1], as before
    mean, std = [0.485, 0.456, 0.406], [0.229, 0.224, 0.225]
    net = Network("resnet18", 3, 10, 20.0, head="linear", mean=mean, std=std).eval()
    by_hand = net.backbone((x - torch.tensor(mean).view(1, 3, 1, 1)) / torch.tensor(std).view(1, 3, 1, 1))
    assert torch.allclose(net.features(x), by_hand, atol=1e-6)
    assert isinstance(net.classifier, torch.nn.Linear) and net.classifier.bias is not None
    spec = network_spec(net, "resnet18", 3, 10, 20.0)
    assert (spec["head"], spec["mean"], spec["std"]) == ("linear", mean, std)
    assert "mean" not in net.state_dict()                                # the spec carries it, once
    save_checkpoint(tmp_path / "c.pt", net, spec, {})
    again, meta = load_checkpoint(tmp_path / "c.pt")
    assert meta["network"]["head"] == "linear"
    assert torch.equal(again.eval()(x)[0], net(x)[0])


# ------------------------------------------------------------------------------- checkpoint layouts
def classifier_balancing(state: dict) -> dict:
    """Kang et al.'s layout: best weights as {feat_model, classifier}, each with DDP's module. prefix."""
    feat = {f"module.{k}": v for k, v in state.items() if not k.startswith("fc.")}
    head = {f"module.{k}": v for k, v in state.items() if k.startswith("fc.")}
    return {"epoch": 90, "best_epoch": 88, "state_dict_best": {"feat_model": feat, "classifier": head}}


@pytest.mark.parametrize("layout,keys", [
    (lambda s: s, []),
    (lambda s: {"state_dict": {f"module.{k}": v for k, v in s.items()}, "epoch": 3}, []),
    (lambda s: {"model": {f"_orig_mod.{k}": v for k, v in s.items()}}, []),
    (classifier_balancing, []),
    (classifier_balancing, ["state_dict_best.feat_model", "state_dict_best.classifier"]),
    (lambda s: {"ema": {"net": s}}, ["ema.net"]),
])
def test_state_dict_layouts(tmp_path, layout, keys):
    state = {"conv1.weight": torch.randn(2, 3), "fc.weight": torch.randn(4, 2), "fc.bias": torch.randn(4)}
    got, _ = read_state_dict(layout(state), keys, tmp_path / "f.pth")
    assert got.keys() == state.keys() and all(torch.equal(got[k], state[k]) for k in state)


def test_a_file_without_a_state_dict_names_its_keys_and_the_way_out(tmp_path):
    with pytest.raises(ConfigError, match=r"not a state dict \(it holds: epoch, ema\); pick one with --key"):
        read_state_dict({"epoch": 1, "ema": {"net": {"w": torch.zeros(1)}, "step": 3}}, [], tmp_path / "f.pth")
    with pytest.raises(ConfigError, match=r"--key ema.nett: no 'nett' \(have: net\)"):
        read_state_dict({"ema": {"net": {"w": torch.zeros(1)}}}, ["ema.nett"], tmp_path / "f.pth")


def test_unreadable_and_untrusted_files_are_one_line(tmp_path):
    pickled = tmp_path / "np.pth"
    torch.save({"state_dict": {"w": torch.zeros(1)}, "best_acc": np.float64(0.5)}, pickled)
    with pytest.raises(ConfigError, match="holds Python objects besides tensors .*add --trust") as e:
        load_file(pickled, trust=False)
    assert "\n" not in str(e.value)
    assert load_file(pickled, trust=True)["best_acc"] == 0.5
    for name, data in (("text.pth", b"hello\n"), ("empty.pth", b""), ("cut.pth", pickled.read_bytes()[:200])):
        (tmp_path / name).write_bytes(data)
        with pytest.raises(ConfigError, match="not a PyTorch checkpoint torch.load can read") as e:
            load_file(tmp_path / name, trust=False)
        assert "\n" not in str(e.value)


def test_a_classifier_balancing_resnet_loads_into_the_torchvision_arch(tmp_path):
    """The published layout, mapped: same logits as the torchvision model it was saved from."""
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "final_model_checkpoint.pth"
    state, used = read_state_dict(classifier_balancing(source.state_dict()), [], path)
    backbone, weight, bias = split_classifier(state, "resnet18", path)
    net = Network("resnet18", 3, 10, 20.0, head="linear").eval()
    load_backbone(net, backbone, "resnet18", path)
    net.classifier.weight.data.copy_(weight)
    net.classifier.bias.data.copy_(bias)
    x = torch.rand(2, 3, 32, 32)
    assert used == ["state_dict_best"] and torch.allclose(net(x)[0], source(x), atol=1e-5)
    with pytest.raises(ConfigError) as e:       # the wrong arch: one line naming the first misfit
        load_backbone(Network("resnet34", 3, 10, 20.0, head="linear"), backbone, "resnet34", path)
    assert "does not fit arch resnet34" in str(e.value) and "missing keys (first: layer1.2." in str(e.value)
    assert "\n" not in str(e.value)


def test_class_names_are_mapped_or_refused(tmp_path):
    path = tmp_path / "f.pth"
    dataset = ["cat", "dog", "emu"]
    assert checkpoint_class_names({"class_to_idx": {"dog": 1, "cat": 0, "emu": 2}}) == dataset
    assert checkpoint_class_names({"classes": ["emu", "cat", "dog"]}) == ["emu", "cat", "dog"]
    assert checkpoint_class_names({"state_dict": {}}) is None
    assert class_order(None, dataset, path) is None and class_order(dataset, dataset, path) is None
    assert class_order(["emu", "cat", "dog"], dataset, path) == [1, 2, 0]     # dataset class i = checkpoint row order[i]
    with pytest.raises(ConfigError, match="class order: its class 2 is 'owl', which the dataset does not have"):
        class_order(["cat", "dog", "owl"], dataset, path)
    with pytest.raises(ConfigError, match="it names 2 classes, the dataset has 3"):
        class_order(["cat", "dog"], dataset, path)


def test_chance_warning():
    assert chance_warning(0.1, 1000) and chance_warning(19.9, 10)
    assert chance_warning(20.0, 10) is None and chance_warning(45.0, 1000) is None


# ------------------------------------------------------------------------------- import, export, distil
@pytest.mark.slow
def test_an_imported_resnet18_is_evaluated_exported_verified_and_distilled(smoke_copy, tmp_path):
    """A torchvision ResNet-18 saved by a script, imported next to the built-in teachers (classes listed in
    another order), exported and distilled with a built-in teacher: cache verify passes, the student trains."""
    pipeline = byo_pipeline(tmp_path, f'name = "rn18"\nsource = "imported"\narch = "resnet18"\n{IMAGENET}')
    args = ["--pipeline", pipeline, "--workdir", smoke_copy.root]
    manifest = Manifest.load(smoke_copy.manifest)
    torch.manual_seed(0)
    source = torchvision.models.resnet18(weights=None, num_classes=10).eval()
    path = tmp_path / "rn18.pth"
    torch.save({"state_dict": {f"module.{k}": v for k, v in source.state_dict().items()},
                "classes": manifest.class_names[::-1]}, path)
    wrong = tmp_path / "rn18_5.pth"
    torch.save(torchvision.models.resnet18(weights=None, num_classes=5).state_dict(), wrong)

    code, out = cbd("import-teacher", "rn18", "--checkpoint", wrong, *args)
    assert code == 2 and "class count: its classifier has 5 classes, the dataset has 10" in out
    assert not smoke_copy.teacher_dir("rn18").exists()
    code, out = cbd("import-teacher", "rn18", "--checkpoint", path, "--arch", "resnet34", *args)
    assert code == 2 and "its [[teachers]] entry says arch = \"resnet18\"" in out

    code, out = cbd("import-teacher", "rn18", "--checkpoint", path, "--arch", "resnet18", *args)
    assert code == 0, out
    folder = smoke_copy.teacher_dir("rn18")
    run, report = read_json(folder / "run.json"), read_json(folder / "eval.json")
    assert run["source_sha256"] == file_sha256(path) and run["source"] == str(path.resolve())
    assert run["kind"] == "teacher (imported, standard)" and run["source_keys"] == ["state_dict"]
    assert {"top1", "many", "medium", "few", "per_class"} <= report.keys()
    assert (run["warning"] is not None) == (report["top1"] < 20)
    net, meta = load_checkpoint(folder / "checkpoint.pt")
    assert meta["network"]["head"] == "linear" and meta["network"]["mean"] == [0.485, 0.456, 0.406]
    fc = source.state_dict()["fc.weight"]
    assert torch.equal(net.classifier.weight, fc.flip(0))         # rows mapped to the dataset's class order
    x = torch.rand(3, 3, 16, 16)
    source.fc = torch.nn.Identity()
    normalised = (x - net.mean) / net.std
    assert torch.allclose(net.eval().features(x), source(normalised), atol=1e-5)

    before = (folder / "checkpoint.pt").stat().st_mtime_ns
    assert cbd("import-teacher", "rn18", "--checkpoint", path, *args)[0] == 0     # the same file: skipped
    assert (folder / "checkpoint.pt").stat().st_mtime_ns == before
    cfg = load_config(pipeline)
    runtime = make_runtime(cfg.pipeline)
    assert train_teacher(cfg, cfg.teacher_by_name("rn18"), smoke_copy, runtime) == folder / "checkpoint.pt"
    moved = load_config(pipeline, ["teachers.rn18.arch=resnet34"])
    with pytest.raises(FileNotFoundError, match="was imported under another arch, mean / std or dataset"):
        train_teacher(moved, moved.teacher_by_name("rn18"), smoke_copy, runtime)

    code, out = cbd("export", *args)           # added to the cache of the built-in teachers: only it runs
    assert code == 0 and "running rn18 (8 shards); std0, aug0 complete, not run" in out, out
    verify = cbd_json("cache", "verify", "--json", *args)
    assert verify["problems"] == [] and "rn18" in verify["teachers_recomputed"]
    teachers = cbd_json("cache", "info", "--json", *args)["teachers"]
    assert teachers["rn18"]["arch"] == "resnet18" and teachers["rn18"]["checkpoint_sha256"] == \
        file_sha256(folder / "checkpoint.pt")
    code, out = cbd("train-student", "--set", "student.teachers=[std0,rn18]", "--set", "student.epochs=1",
                    "--set", "student.name=mixed", *args)
    assert code == 0, out
    student, _ = load_checkpoint(smoke_copy.student_dir("mixed") / "checkpoint.pt")
    assert student.classifier.weight.shape[1] == 64 + 512                    # h maps onto both teachers' targets
    assert read_json(smoke_copy.student_dir("mixed") / "run.json")["teachers"].keys() == {"std0", "rn18"}


@pytest.mark.slow
@pytest.mark.skipif(not timm_installed(), reason="timm is not installed (pip install 'cbd-cache[timm]')")
def test_a_timm_teacher_and_a_timm_student_on_the_smoke_pipeline(smoke_copy, tmp_path):
    """A small timm model (random init, saved by the test) imported as a teacher with its own timm
    normalisation, exported next to the built-ins, and a `timm:` student distilling a mix of both."""
    timm = pytest.importorskip("timm")   # skipped above, before the smoke workdir is built, when it is missing
    pipeline = byo_pipeline(tmp_path, 'name = "eff"\nsource = "imported"\narch = "timm:test_efficientnet"\n')
    args = ["--pipeline", pipeline, "--workdir", smoke_copy.root]
    torch.manual_seed(0)
    path = tmp_path / "eff.pth"
    torch.save(timm.create_model("test_efficientnet", pretrained=False, num_classes=10).state_dict(), path)
    code, out = cbd("import-teacher", "eff", "--checkpoint", path, *args)
    assert code == 0, out
    net, meta = load_checkpoint(smoke_copy.teacher_checkpoint("eff"))
    cfg_mean = list(timm.models.get_pretrained_cfg("test_efficientnet").mean)
    assert meta["network"]["mean"] == pytest.approx(cfg_mean) and meta["network"]["descriptor_dim"] == net.dim

    assert cbd("export", *args)[0] == 0       # added to the cache of the built-in teachers
    code, out = cbd("cache", "verify", *args)
    assert code == 0 and "OK" in out, out
    code, out = cbd("train-student", "--set", "student.arch=timm:test_resnet", "--set", "student.teachers=[aug0,eff]",
                    "--set", "student.epochs=1", "--set", "student.name=timm_student", *args)
    assert code == 0, out
    folder = smoke_copy.student_dir("timm_student")
    student, smeta = load_checkpoint(folder / "checkpoint.pt")
    assert smeta["network"]["arch"] == "timm:test_resnet" and student.classifier.weight.shape[1] == 64 + net.dim
    assert 0 <= read_json(folder / "eval.json")["top1"] <= 100


def test_without_timm_a_timm_arch_is_one_line(monkeypatch):
    """Where timm is missing, `timm:` names are refused with the install line, not a traceback."""
    import builtins

    real = builtins.__import__

    def no_timm(name, *a, **k):
        if name == "timm":
            raise ImportError("No module named 'timm'")
        return real(name, *a, **k)

    monkeypatch.setattr(builtins, "__import__", no_timm)
    with pytest.raises(ConfigError, match=r"student.arch='timm:test_resnet': timm is not installed: pip install"):
        smoke_config("student.arch=timm:test_resnet")
    assert dataclasses.is_dataclass(smoke_config())
