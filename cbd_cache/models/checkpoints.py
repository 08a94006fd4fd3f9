"""Checkpoints: the network's weights plus everything needed to rebuild it and to know where it came from."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from cbd_cache.models.networks import Network
from cbd_cache.system.storage import atomic_write_bytes


def network_spec(net: Network, arch: str, in_channels: int, num_classes: int, gamma: float) -> dict[str, Any]:
    """What rebuilds the network: architecture, sizes, head and the input normalisation it was trained with."""
    net = _unwrap(net)
    proj = net.projection[0].out_features if isinstance(net.projection, torch.nn.Sequential) else 0
    head = "linear" if isinstance(net.classifier, torch.nn.Linear) else "cosine"
    return {"arch": arch, "in_channels": in_channels, "num_classes": num_classes, "gamma": gamma,
            "projection_dim": proj, "descriptor_dim": net.dim, "head": head,
            "mean": _decimal(net.mean), "std": _decimal(net.std)}


def save_checkpoint(path: Path, net: Network, spec: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomic: written to a temporary file, then renamed, so a reader never sees half a checkpoint."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in _unwrap(net).state_dict().items()}
    torch.save({"network": spec, "state_dict": state, "meta": meta}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[Network, dict[str, Any]]:
    """(network with weights, meta). `meta` holds the config, seed and accuracies recorded at save."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no checkpoint")
    ckpt = torch.load(path, map_location=map_location, weights_only=True)
    spec = ckpt["network"]
    net = Network(spec["arch"], spec["in_channels"], spec["num_classes"], spec["gamma"], spec["projection_dim"],
                  spec["head"], spec["mean"], spec["std"])
    net.load_state_dict(ckpt["state_dict"])
    return net, {**ckpt["meta"], "network": spec}


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DistributedDataParallel wrappers."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


def _decimal(t: torch.Tensor) -> list[float]:
    """A float32 buffer as the decimals it was made from (0.485, not 0.48500001430511475): same float32 again."""
    return [float(f"{x:.7g}") for x in t.flatten().tolist()]
