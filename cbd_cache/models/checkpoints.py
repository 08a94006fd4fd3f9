"""Checkpoints: the network's weights plus everything needed to rebuild it and to know where it came from."""
from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import torch

from cbd_cache.errors import FileDamaged, NonFiniteLoss
from cbd_cache.models.networks import Network, head_of
from cbd_cache.system.storage import atomic_write_bytes
from cbd_cache.workdir import rebuild_command


def network_spec(net: Network, arch: str, in_channels: int, num_classes: int, gamma: float) -> dict[str, Any]:
    """What rebuilds the network: architecture, sizes, head and the input normalisation it was trained with."""
    net = _unwrap(net)
    proj = net.projection[0].out_features if isinstance(net.projection, torch.nn.Sequential) else 0
    head, per_class = head_of(net.classifier)
    return {"arch": arch, "in_channels": in_channels, "num_classes": num_classes, "gamma": gamma,
            "projection_dim": proj, "descriptor_dim": net.dim, "head": head, "per_class": per_class,
            "mean": _decimal(net.mean), "std": _decimal(net.std)}


def max_abs(tensors: list[torch.Tensor]) -> torch.Tensor:
    """Each tensor's largest |value| (NaN if it holds one), in a few kernels: the training loop checks every step."""
    return torch.stack([n.float() for n in torch._foreach_norm(tensors, float("inf"))])


def floating(state: dict[str, Any]) -> dict[str, torch.Tensor]:
    """The parameters and buffers whose values can go non-finite (not num_batches_tracked, say)."""
    return {k: v for k, v in state.items() if torch.is_tensor(v) and v.is_floating_point() and v.numel()}


def non_finite(state: dict[str, Any]) -> str | None:
    """The name of the first parameter or buffer (BatchNorm's running_var too) holding a NaN or inf, else None."""
    named = floating(state)
    if not named:
        return None
    finite = torch.isfinite(max_abs(list(named.values()))).tolist()
    return next((k for k, ok in zip(named, finite) if not ok), None)


def refuse_non_finite(path: Path, state: dict[str, Any], fix: str) -> None:
    bad = non_finite(state)
    if bad is not None:
        raise NonFiniteLoss(f"{path}: {bad} holds non-finite values (a training that diverged); {fix}")


def read_torch(path: Path, map_location: str | torch.device = "cpu") -> dict[str, Any]:
    """`torch.load` of a file this tool wrote (tensors only); a torn or foreign one is refused in one line."""
    try:
        ckpt = torch.load(path, map_location=map_location, weights_only=True)
    except Exception as e:   # a truncated zip, a pickle of something else: whatever torch's reader met
        first = (str(e).strip().splitlines() or [""])[0][:120]
        raise FileDamaged(f"{path} is torn or not a checkpoint of this tool ({type(e).__name__}: {first}); "
                          f"write it again: {rebuild_command(path)}") from None
    if not isinstance(ckpt, dict):
        raise FileDamaged(f"{path} is not a checkpoint of this tool; write it again: {rebuild_command(path)}")
    return ckpt


def save_checkpoint(path: Path, net: Network, spec: dict[str, Any], meta: dict[str, Any]) -> None:
    """Atomic: written to a temporary file, then renamed, so a reader never sees half a checkpoint.
    Non-finite weights are refused: a diverged model is never saved as one."""
    buf = io.BytesIO()
    state = {k: v.detach().cpu() for k, v in _unwrap(net).state_dict().items()}
    refuse_non_finite(path, state, "it is not saved; train again with a lower lr")
    torch.save({"network": spec, "state_dict": state, "meta": meta}, buf)
    atomic_write_bytes(Path(path), buf.getvalue())


def load_checkpoint(path: Path, map_location: str | torch.device = "cpu") -> tuple[Network, dict[str, Any]]:
    """(network with weights, meta). `meta` holds the config, seed and accuracies recorded at save."""
    if not Path(path).is_file():
        raise FileNotFoundError(f"{path}: no checkpoint")
    ckpt = read_torch(path, map_location)
    try:
        spec, state = ckpt["network"], ckpt["state_dict"]
        net = Network(spec["arch"], spec["in_channels"], spec["num_classes"], spec["gamma"], spec["projection_dim"],
                      spec["head"], spec["mean"], spec["std"], spec.get("per_class", False))
        refuse_non_finite(path, state, f"train it again with a lower lr: {rebuild_command(path)}")
        net.load_state_dict(state)
    except (KeyError, TypeError, RuntimeError) as e:   # a file of another layout, or weights of another network
        first = (str(e).strip().splitlines() or [""])[0][:160]
        raise FileDamaged(f"{path} does not hold the network its spec names ({type(e).__name__}: {first}); "
                          f"write it again: {rebuild_command(path)}") from None
    return net, {**ckpt["meta"], "network": spec}


def _unwrap(net: torch.nn.Module) -> torch.nn.Module:
    """The plain module under torch.compile / DistributedDataParallel wrappers."""
    net = getattr(net, "_orig_mod", net)
    return getattr(net, "module", net)


def _decimal(t: torch.Tensor) -> list[float]:
    """A float32 buffer as the decimals it was made from (0.485, not 0.48500001430511475): same float32 again."""
    return [float(f"{x:.7g}") for x in t.flatten().tolist()]
