"""`cbd-cache import-teacher`: a checkpoint trained elsewhere, made a teacher of the workdir.

The teacher is a `[[teachers]]` entry with `source = "imported"`; its entry gives the architecture
(`arch`: a torchvision ResNet-family name or `timm:<name>`) and the input normalisation (`mean` /
`std`). Import reads the file's state dict in the usual layouts, keeps the file's own classifier
(a linear fc with bias: the network's `linear` head) mapped to the dataset's classes, evaluates the
teacher on the held-out split, and writes `W/teachers/<name>/` like a trained teacher (checkpoint,
eval report, run.json with the source path and SHA-256), so export, verify, NCM and the students
use it as any other. Only the descriptor (the pooled pre-logits feature) is distilled; the
classifier serves evaluation and logit distillation.
"""
from __future__ import annotations

import dataclasses
import pickle
from pathlib import Path
from typing import Any

import torch

from cbd_cache.config import Config
from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import ConfigError
from cbd_cache.config.archs import TIMM, TORCHVISION
from cbd_cache.models.checkpoints import network_spec
from cbd_cache.models.networks import Network, classifier_prefix
from cbd_cache.stages.teachers import imported_identity, teacher_network
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.logs import log
from cbd_cache.system.runtime import Runtime
from cbd_cache.system.tables import fmt
from cbd_cache.train.evaluation import evaluate_network
from cbd_cache.train.runs import is_done, save_run
from cbd_cache.workdir import CHECKPOINT, Workdir

# where a checkpoint file keeps its state dict when it is not bare, in the order they are tried
# (classifier-balancing: state_dict_best = {"feat_model": ..., "classifier": ...})
LAYOUT_KEYS = ("state_dict_best", "state_dict", "model")


WRAPPER_PREFIXES = ("module.", "_orig_mod.")   # DistributedDataParallel, torch.compile


CLASS_NAME_KEYS = ("class_names", "classes")   # a list of names, in the classifier's order (or class_to_idx)


def load_file(path: Path, trust: bool) -> Any:
    """The checkpoint file's object: tensors and plain containers only, unless the user trusts the file."""
    try:
        return torch.load(path, map_location="cpu", weights_only=not trust)
    except pickle.UnpicklingError as e:   # weights_only met something else than tensors and containers
        lines = [line.strip() for line in str(e).splitlines() if "Unsupported global" in line] or ["not tensors"]
        raise ConfigError(f"{path}: holds Python objects besides tensors ({lines[0][:160]}); if it is a "
                          "checkpoint you trust, add --trust to unpickle it") from None
    except Exception as e:   # torch.load raises whatever its reader met: KeyError, RuntimeError, EOFError, ...
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise ConfigError(f"{path}: not a PyTorch checkpoint torch.load can read ({type(e).__name__}: {first})") from None


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, dict) and bool(obj) and all(torch.is_tensor(v) for v in obj.values())


def _strip(key: str) -> str:
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if key.startswith(prefix):
                key, changed = key[len(prefix):], True
    return key


def _merge(obj: Any, where: str, path: Path) -> dict[str, torch.Tensor]:
    """A state dict, or a dict of state dicts (sub-models, merged), with wrapper prefixes stripped."""
    if _is_state_dict(obj):
        parts = [obj]
    elif isinstance(obj, dict) and obj and all(_is_state_dict(v) for v in obj.values()):
        parts = list(obj.values())
    else:
        keys = ", ".join(map(str, list(obj)[:8])) if isinstance(obj, dict) else type(obj).__name__
        raise ConfigError(f"{path}: {where} is not a state dict (it holds: {keys}); pick one with --key")
    merged: dict[str, torch.Tensor] = {}
    for part in parts:
        for k, v in part.items():
            merged[_strip(k)] = v
    return merged


def read_state_dict(obj: Any, keys: list[str], path: Path) -> tuple[dict[str, torch.Tensor], list[str]]:
    """(state dict, the keys it came from) inside a loaded checkpoint.

    Layouts: a bare state dict, {"state_dict_best" | "state_dict" | "model": ...}, or the dotted `keys`
    given (`--key a.b`, several are merged); a value that is a dict of state dicts is merged too.
    """
    if keys:
        merged: dict[str, torch.Tensor] = {}
        for key in keys:
            node = obj
            for part in key.split("."):
                if not isinstance(node, dict) or part not in node:
                    have = ", ".join(map(str, list(node)[:8])) if isinstance(node, dict) else type(node).__name__
                    raise ConfigError(f"{path}: --key {key}: no {part!r} (have: {have})")
                node = node[part]
            merged.update(_merge(node, f"--key {key}", path))
        return merged, list(keys)
    if isinstance(obj, dict) and not _is_state_dict(obj):
        for key in LAYOUT_KEYS:
            if isinstance(obj.get(key), dict):
                return _merge(obj[key], repr(key), path), [key]
    return _merge(obj, "the file", path), []


def checkpoint_class_names(obj: Any) -> list[str] | None:
    """The class names a checkpoint carries, in its classifier's order (None when it carries none)."""
    if not isinstance(obj, dict):
        return None
    for key in CLASS_NAME_KEYS:
        if isinstance(obj.get(key), (list, tuple)) and all(isinstance(c, str) for c in obj[key]):
            return list(obj[key])
    index = obj.get("class_to_idx")
    if isinstance(index, dict) and sorted(index.values()) == list(range(len(index))):
        return sorted(index, key=index.get)
    return None


def class_order(names: list[str] | None, dataset: list[str], path: Path) -> list[int] | None:
    """Row i of the dataset's classifier is row order[i] of the checkpoint's; None keeps the order.

    The same classes in another order are mapped; a class the dataset lacks is refused.
    """
    if names is None or names == dataset:
        return None
    if len(names) != len(dataset):
        raise ConfigError(f"{path}: it names {len(names)} classes, the dataset has {len(dataset)}")
    if sorted(names) != sorted(dataset):
        c = next(n for n in names if n not in dataset)
        raise ConfigError(f"{path}: class order: its class {names.index(c)} is {c!r}, which the dataset does not have; "
                          "import a checkpoint trained on this dataset's classes")
    return [names.index(c) for c in dataset]


def split_classifier(state: dict[str, torch.Tensor], arch: str, path: Path) -> tuple[dict, torch.Tensor, torch.Tensor]:
    """(backbone state, classifier weight (C, d), bias (C,)) from a full model's state dict."""
    prefix = classifier_prefix(arch) + "."
    head = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    if "weight" not in head:
        raise ConfigError(f"{path}: no classifier ({prefix}weight) for --arch {arch}; import-teacher keeps the "
                          "checkpoint's own classifier to evaluate it (pick the state dicts with --key)")
    weight = head["weight"].reshape(head["weight"].shape[0], -1)    # a 1x1-conv classifier is a linear one
    bias = head.get("bias", torch.zeros(weight.shape[0]))
    return {k: v for k, v in state.items() if not k.startswith(prefix)}, weight, bias


def load_backbone(net: Network, state: dict[str, torch.Tensor], arch: str, path: Path) -> None:
    """The checkpoint's weights into `net.backbone`; every key and shape must fit, with one line when not."""
    inner = "model." if arch.startswith(TIMM) else ""       # TimmBackbone holds the timm model as .model
    state = {inner + k: v for k, v in state.items()}
    own = net.backbone.state_dict()
    missing = [k for k in own if k not in state and not k.endswith("num_batches_tracked")]
    unexpected = [k for k in state if k not in own]
    shapes = [f"{k} {tuple(state[k].shape)} vs {tuple(own[k].shape)}" for k in own
              if k in state and state[k].shape != own[k].shape]
    if missing or unexpected or shapes:
        parts = [f"{len(v)} {what} (first: {v[0]})" for what, v in
                 (("missing keys", missing), ("unexpected keys", unexpected), ("of another shape", shapes)) if v]
        raise ConfigError(f"{path}: does not fit arch {arch}: {'; '.join(parts)}; check the arch, or pick the "
                          "state dict with --key")
    own.update(state)
    net.backbone.load_state_dict(own)


def chance_warning(top1: float, num_classes: int) -> str | None:
    """A loud line when the teacher scores near chance (under twice 100/C): the classic failure of
    published long-tail checkpoints (wrong layout, class order or normalisation) that load and then score ~0%."""
    chance = 100.0 / num_classes
    if top1 >= 2 * chance:
        return None
    return (f"top-1 {top1:.2f}% is near chance ({chance:.2f}%): check the class order, the arch, --key and the "
            "entry's mean / std before distilling this teacher")


def import_teacher(cfg: Config, wd: Workdir, runtime: Runtime, name: str, path: Path, arch: str = "",
                   keys: tuple[str, ...] = (), trust: bool = False) -> Path:
    """Make teacher `name` (a `source = "imported"` entry) from the checkpoint file at `path`; returns its checkpoint."""
    names = [t.name for t in cfg.teachers]
    if name not in names:
        raise ConfigError(f"import-teacher {name}: the pipeline has no [[teachers]] entry {name!r} (have {names}); "
                          f"add one with name = \"{name}\", source = \"imported\" and its arch")
    t = cfg.teacher_by_name(name)
    if t.source != "imported":
        raise ConfigError(f"import-teacher {name}: teachers.{name}.source={t.source!r}; only a teacher with "
                          "source = \"imported\" is made from a checkpoint")
    if arch and arch != t.arch:
        raise ConfigError(f"import-teacher {name} --arch {arch}: its [[teachers]] entry says arch = \"{t.arch}\"; "
                          "make them agree (the entry is what export and the students read)")
    if not (t.arch in TORCHVISION or t.arch.startswith(TIMM)):
        raise ConfigError(f"teachers.{name}.arch={t.arch!r}: import takes a torchvision ResNet-family name "
                          f"({', '.join(TORCHVISION)}) or timm:<name>")
    path = Path(path)
    if not path.is_file():
        raise FileNotFoundError(f"--checkpoint {path}: no such file")
    manifest = Manifest.load(wd.manifest)
    folder, sha = wd.teacher_dir(name), file_sha256(path)
    identity = imported_identity(t, manifest, sha)
    if is_done(folder, identity):
        log(f"[import {name}] {path} ({sha[:12]}) is already imported under this entry; skipping")
        return folder / CHECKPOINT
    obj = load_file(path, trust)
    state, used = read_state_dict(obj, list(keys), path)
    net = teacher_network(t, manifest, head="linear")
    backbone, weight, bias = split_classifier(state, t.arch, path)
    if weight.shape[0] != manifest.num_classes:
        raise ConfigError(f"{path}: class count: its classifier has {weight.shape[0]} classes, the dataset has "
                          f"{manifest.num_classes}; import a checkpoint trained on this dataset's classes")
    if weight.shape[1] != net.dim:
        raise ConfigError(f"{path}: its classifier takes {weight.shape[1]}-d features, arch {t.arch} gives {net.dim}-d; "
                          "check the arch")
    order = class_order(checkpoint_class_names(obj), manifest.class_names, path)
    if order is not None:
        log(f"[import {name}] the checkpoint lists the classes in another order; its classifier rows are mapped")
        weight, bias = weight[order], bias[order]
    load_backbone(net, backbone, t.arch, path)
    with torch.no_grad():
        net.classifier.weight.copy_(weight)
        net.classifier.bias.copy_(bias)
    spec = network_spec(net, t.arch, manifest.channels, manifest.num_classes, t.gamma)
    log(f"[import {name}] {path} ({sha[:12]}{', keys ' + '+'.join(used) if used else ''}): {t.arch}, "
        f"{net.dim}-d descriptor, input mean {spec['mean']}, std {spec['std']}")
    test = evaluate_network(net, manifest, cfg, runtime, manifest.eval_split)
    log(f"[import {name}] {manifest.eval_split}: top-1 {test['top1']:.2f}  many {fmt(test['many'])}  "
        f"medium {fmt(test['medium'])}  few {fmt(test['few'])}")
    warning = chance_warning(test["top1"], manifest.num_classes)
    if warning:
        log(f"[import {name}] WARNING: {warning}")
    meta = {"kind": t.kind(), "name": name, "type": t.type, "seed": t.seed, "config": dataclasses.asdict(t),
            "manifest_fingerprint": manifest.fingerprint, "source": str(path.resolve()), "source_sha256": sha,
            "source_keys": used, "test_top1": test["top1"], "warning": warning}
    return save_run(folder, net, spec, meta, identity, [], test, manifest.class_names)
