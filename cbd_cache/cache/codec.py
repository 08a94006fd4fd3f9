"""int8 storage of descriptors: symmetric per-vector quantisation with a float16 scale."""
from __future__ import annotations

import numpy as np

INT8_MAX = 127


def quantize_int8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Symmetric per-vector int8 over the last axis: (q int8, scale float16) with x ~= scale * q.

    The scale is rounded to float16 before q is computed, so `dequantize_int8` inverts exactly what
    was stored; a zero vector gets scale 0 and q = 0.
    """
    x = np.asarray(x, dtype=np.float32)
    scale = (np.abs(x).max(axis=-1) / INT8_MAX).astype(np.float16)
    s32 = scale.astype(np.float32)[..., None]
    q = np.divide(x, s32, out=np.zeros_like(x), where=s32 > 0)
    return np.clip(np.rint(q), -INT8_MAX, INT8_MAX).astype(np.int8), scale


def dequantize_int8(q: np.ndarray, scale: np.ndarray, dtype: str | np.dtype = np.float32) -> np.ndarray:
    """scale * q, computed in float32, returned as `dtype`."""
    return (q.astype(np.float32) * scale.astype(np.float32)[..., None]).astype(dtype, copy=False)


def logits_dtype(dtype: str) -> str:
    """Logits are not quantised: an int8 cache stores them as float16."""
    return "float16" if dtype == "int8" else dtype
