"""`cbd-cache export-model`: a trained model as files anyone can load without this package.

OUT/model.safetensors holds the weights under the names of a plain network: a torchvision ResNet
(or, for the small ResNets, the README's 15-line one) whose `fc` is the cosine head
z = gamma * <normalize(W), normalize(e)>, e = ReLU(P v + b) with a projection, else v. The head
cannot be folded into a Linear `fc`: normalize(v) divides each image by its own norm. An imported
teacher keeps its own Linear `fc` (`classifier`: "linear") and its input mean / std.
OUT/model.json says what the network is and, exactly, what its input is. The README's "Use the
student" snippet loads both; tests/test_portable.py runs it without cbd-cache and compares logits.
"""
from __future__ import annotations

from pathlib import Path

from safetensors.torch import save

from cbd_cache.data.manifest import Manifest
from cbd_cache.errors import ConfigError
from cbd_cache.config.archs import SMALL_DEPTHS, TIMM
from cbd_cache.models.checkpoints import load_checkpoint
from cbd_cache.system.digests import file_sha256
from cbd_cache.system.storage import atomic_write_bytes, write_json
from cbd_cache.views import ViewSpec

FORMAT = "cbd-cache portable model 1"
HEADS = {"cosine": "z = gamma * <W / |W|, e / |e|>, no bias; e = ReLU(P v + b) when projection_dim > 0, else v",
         "linear": "z = W v + b: an imported model's own fc (projection_dim 0)"}


def portable_name(key: str) -> str:
    """Network's state-dict name -> the plain network's: the backbone's own names, the head as `fc`."""
    if key.startswith("backbone."):
        return key[len("backbone."):]
    if key.startswith("projection."):
        return f"fc.{key}"
    if key in ("classifier.weight", "classifier.bias"):
        return f"fc.{key.split('.')[1]}"
    raise ValueError(f"unexpected parameter {key!r}")


def input_spec(channels: int, spec: ViewSpec, mean: list[float], std: list[float]) -> dict:
    """What the network's input is: the evaluation view (views.eval_view), as float pixels in [0, 1], less
    `mean`, over `std` (0 and 1 for this tool's own models)."""
    plain = all(m == 0 for m in mean) and all(s == 1 for s in std)
    resize = (f"resize the short side to {spec.eval_resize_px} px, then centre-crop {spec.image_px} x {spec.image_px}"
              if spec.eval_resize_px else f"resize the whole image to {spec.image_px} x {spec.image_px} (aspect not kept)")
    return {"shape": [channels, spec.image_px, spec.image_px], "mode": "L" if channels == 1 else "RGB",
            "dtype": "float32", "range": [0.0, 1.0], "mean": list(mean), "std": list(std),
            "pixels": "8-bit values times 1/255; " + ("no mean / std normalisation" if plain else
                                                      "then (x - mean) / std per channel"),
            "eval_resize_px": spec.eval_resize_px, "crop_px": spec.image_px,
            "preprocess": f"{resize}; antialiased bilinear resize on the uint8 image"}


def export_model(ckpt: Path, out: Path, manifest: Manifest, spec: ViewSpec, ref: str) -> Path:
    """Write OUT/model.safetensors and OUT/model.json for the checkpoint; returns the JSON's path."""
    net, meta = load_checkpoint(ckpt)
    n = meta["network"]
    if n["arch"].startswith(TIMM):
        raise ConfigError(f"--run {ref}: {n['arch']} is a timm model; export-model writes the torchvision and small "
                          "ResNets the README's loader rebuilds (load a timm model with timm and its checkpoint)")
    if n.get("per_class") or (n["head"] == "linear" and n["projection_dim"]):
        raise ConfigError(f"export-model: {ref} has a {'per-class scaled ' if n.get('per_class') else ''}{n['head']} "
                          f"head{'' if n.get('per_class') else ' after a projection'} (LWS, logit adjustment, or "
                          "student.head=linear with several teachers); model.json describes a cosine head, or a plain "
                          "linear fc (an imported teacher's), so export one of those")
    out.mkdir(parents=True, exist_ok=True)
    weights = save({portable_name(k): v.contiguous() for k, v in net.state_dict().items()})
    atomic_write_bytes(out / "model.safetensors", weights)   # (write then rename, as every writer here)
    small = n["arch"] in SMALL_DEPTHS
    info = {"format": FORMAT, "arch": n["arch"], "family": "small_resnet" if small else "torchvision",
            "depth": SMALL_DEPTHS.get(n["arch"]), "in_channels": n["in_channels"], "num_classes": n["num_classes"],
            "class_names": manifest.class_names, "descriptor_dim": n["descriptor_dim"],
            "projection_dim": n["projection_dim"], "gamma": n["gamma"],
            "classifier": n["head"],
            "head": HEADS[n["head"]],
            "input": input_spec(n["in_channels"], spec, n["mean"], n["std"]),
            "source": {"run": ref, "checkpoint_sha256": file_sha256(ckpt), "kind": meta.get("kind")}}
    write_json(out / "model.json", info)
    return out / "model.json"
