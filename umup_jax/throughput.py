"""Throughput: model FLOPs per token, accelerator peaks, MFU and peak device memory.

Model FLOPs of one training step on T tokens of sequence length S (:func:`train_flops_per_token`
gives them per token; a multiply-add is 2 FLOPs; forward + backward = 3 × forward, the backward
pass doing two matmuls per forward matmul):

    FLOPs = 6·N·T + 6·L·H·D_h·(S+1)·T

* ``6·N·T``: every parameter that multiplies an activation does 2 FLOPs per token forward and
  4 backward.  N counts the parameters of the matmuls: per layer the fused QKV (d·3·H·D_h),
  the attention output (H·D_h·d) and the SwiGLU up, gate and down (3·d·f), plus the readout
  (d·V).  The embedding table is **not** in N: its forward is a gather (no FLOPs) and its
  gradient a scatter-add (u-μP paper Table 5's 19.5 M parameters include it; these FLOPs do
  not).
* ``6·L·H·D_h·(S+1)·T``: attention's two matmuls per head, q·kᵀ and probabilities·v, counting
  only the S(S+1)/2 query-key pairs a **causal** mask keeps (the diagonal included): per
  sequence, layer and head 2·D_h·S(S+1)/2 FLOPs each forward, ×2 matmuls, ×3 for training,
  = 6·D_h·S(S+1); per token (÷ S) 6·D_h·(S+1).  PaLM's MFU (Chowdhery et al. 2022, App. B)
  counts the full S² instead, 12·L·H·D_h·S per token, which would add ≈ 6·L·H·D_h·S per token
  to ours.  A kernel that skips the masked half (cuDNN flash attention) does about our count;
  the XLA path computes (and discards) the masked half too, which these FLOPs do not credit.

Rematerialisation recomputes part of the forward pass; that work is not model FLOPs (MFU, not
hardware FLOPs utilisation), so remat lowers MFU.  Norms, RoPE, softmax, the loss and the
optimizer are elementwise and not counted.

MFU = (tokens/s · FLOPs per token) / (devices · peak FLOP/s per device).  The peak is the dense
(no sparsity) tensor-core peak of the device for the model's compute dtype, from
:data:`PEAK_TFLOPS` (NVIDIA datasheets); an unknown device (a CPU, say) gives ``nan``.  FP8
runs are measured against the BF16 peak (their compute dtype): the FP8 matmuls can run at up to
2× that, so an FP8 run's MFU can exceed what BF16 could reach.  ``float32`` uses the TF32 peak:
XLA computes fp32 matmuls with TF32 tensor cores at JAX's default precision on Ampere and newer.
"""

from __future__ import annotations

import math
import re
from typing import Any, Optional, Sequence

import jax

from umup_jax.model import ModelConfig

# (name as a whole word of jax's device_kind, name, dense peak TFLOP/s by compute dtype);
# first match wins, so a more specific name comes before a shorter one it begins with.  Whole
# words: "L4" is not found in "NVIDIA L40", nor "H200" in "NVIDIA GH200".
PEAK_TFLOPS: tuple[tuple[str, str, dict[str, float]], ...] = (
    ("H100 PCIe", "H100 PCIe", {"bfloat16": 756.0, "float16": 756.0, "float8": 1513.0,
                                "float32": 378.0}),
    ("H100 NVL", "H100 NVL", {"bfloat16": 835.0, "float16": 835.0, "float8": 1670.0,
                              "float32": 418.0}),
    ("H200 NVL", "H200 NVL", {"bfloat16": 835.0, "float16": 835.0, "float8": 1670.0,
                              "float32": 418.0}),
    ("GH200", "GH200 (H100 SXM compute)", {"bfloat16": 989.4, "float16": 989.4,
                                           "float8": 1978.9, "float32": 494.7}),
    ("H200", "H200 SXM", {"bfloat16": 989.4, "float16": 989.4, "float8": 1978.9,
                          "float32": 494.7}),
    ("H100", "H100 SXM", {"bfloat16": 989.4, "float16": 989.4, "float8": 1978.9,
                          "float32": 494.7}),
    # Blackwell (NVIDIA Blackwell architecture technical brief, dense): the GB200 superchip's
    # B200 (1200 W) before the HGX B200 (1000 W), whose name it contains.
    ("GB200", "GB200 (B200 at 1200 W)", {"bfloat16": 2500.0, "float16": 2500.0,
                                          "float8": 5000.0, "float32": 1250.0}),
    ("B200", "B200 (HGX, 1000 W)", {"bfloat16": 2250.0, "float16": 2250.0, "float8": 4500.0,
                                    "float32": 1100.0}),
    ("A100", "A100", {"bfloat16": 312.0, "float16": 312.0, "float32": 156.0}),
    ("L40S", "L40S", {"bfloat16": 362.05, "float16": 362.05, "float8": 733.0,
                      "float32": 183.0}),
    ("L40", "L40", {"bfloat16": 181.05, "float16": 181.05, "float8": 362.0,
                    "float32": 90.5}),
    ("L4", "L4", {"bfloat16": 121.0, "float16": 121.0, "float8": 242.5, "float32": 60.0}),
)


def peak_flops(device_kind: str, dtype: str) -> float:
    """Dense peak FLOP/s of one device of ``device_kind`` (``jax.Device.device_kind``, e.g.
    ``'NVIDIA H100 80GB HBM3'``) for compute dtype ``dtype``; ``nan`` if unknown."""
    for pattern, _, peaks in PEAK_TFLOPS:
        if re.search(rf"(?<![a-z0-9]){re.escape(pattern.lower())}(?![a-z0-9])",
                     device_kind.lower()):
            tflops = peaks.get(dtype)
            return float("nan") if tflops is None else tflops * 1e12
    return float("nan")


def matmul_params(cfg: ModelConfig) -> int:
    """N of the FLOPs formula: the parameters of every matmul (all but the embedding)."""
    d, a, f = cfg.width, cfg.attn_dim, cfg.ffn_hidden
    per_layer = d * 3 * a + a * d + 3 * d * f
    return cfg.depth * per_layer + d * cfg.vocab_size


def attention_flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None) -> float:
    """Causal attention's training FLOPs per token, 6·L·H·D_h·(S+1) (module docstring)."""
    s = cfg.seq_len if seq_len is None else seq_len
    return 6.0 * cfg.depth * cfg.num_heads * cfg.head_dim * (s + 1)


def train_flops_per_token(cfg: ModelConfig, seq_len: Optional[int] = None) -> float:
    """Model FLOPs of one training step per token: 6·N + 6·L·H·D_h·(S+1)."""
    return 6.0 * matmul_params(cfg) + attention_flops_per_token(cfg, seq_len)


def mfu(tokens_per_s: float, flops_per_token: float, peak_per_device: float,
        num_devices: int) -> float:
    """Model FLOPs utilisation in [0, 1]; ``nan`` when the peak is unknown."""
    if not (peak_per_device > 0 and math.isfinite(peak_per_device)) or num_devices < 1:
        return float("nan")
    return tokens_per_s * flops_per_token / (peak_per_device * num_devices)


def device_kind(devices: Optional[Sequence[Any]] = None) -> str:
    devices = list(devices) if devices is not None else jax.devices()
    return devices[0].device_kind


def peak_memory_bytes(devices: Optional[Sequence[Any]] = None) -> Optional[int]:
    """The most bytes any of ``devices`` (default: this process's) has held at once, from
    ``Device.memory_stats()['peak_bytes_in_use']``; ``None`` where the backend reports none
    (the CPU backend)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    peaks = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # a backend without memory statistics
            stats = None
        if stats and "peak_bytes_in_use" in stats:
            peaks.append(int(stats["peak_bytes_in_use"]))
    return max(peaks) if peaks else None
