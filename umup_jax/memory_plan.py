"""Will the train step fit?  XLA's memory plan of a compiled step against the device's limit.

A step that does not fit a GPU fails only when it first runs, after the data is loaded and the
state is built, with XLA's ``RESOURCE_EXHAUSTED`` and a dump of its buffer assignment.  XLA
knows the answer when it compiles: its buffer assignment fixes, per device,

    step bytes = arguments + outputs + temporaries − aliases

(``Compiled.memory_analysis()``: the state and the batch, the new state and the metrics, the
one block of temporaries the program allocates, less the outputs that reuse donated inputs).
All of it is live while the step runs, so a plan over the allocator's limit cannot run. The
eval step takes only the params; the optimizer state stays on the devices beside it and is
added to its plan; it computes its batch in pieces of a training micro-batch
(:func:`eval_pieces`), so it needs no more than a micro-batch's forward pass. The trainer
(:mod:`umup_jax.train`) compiles its train, stats and eval steps before the first step, prints
the train step's plan, and stops with :class:`StepMemoryError` naming what would shrink a
program that does not fit.

The limit is the allocator's ``Device.memory_stats()['bytes_limit']``: on a GPU what JAX's
allocator may use, by default 75% of the device's memory (``XLA_PYTHON_CLIENT_MEM_FRACTION``,
JAX's GPU memory allocation notes), not the device's whole memory.  The CPU backend reports no
limit; nothing is checked there.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence

import jax

GIB = 2**30
# The share of a GPU's memory JAX's allocator takes by default (XLA_PYTHON_CLIENT_MEM_FRACTION
# unset): what ``bytes_limit`` reports there, and so what a step may plan.
DEFAULT_GPU_MEM_FRACTION = 0.75


class StepMemoryError(ValueError):
    """A compiled step (train or eval) needs more memory per device than the allocator's
    limit."""


def compiled_step_bytes(compiled: Any) -> Optional[int]:
    """What XLA planned for one call of ``compiled`` (a ``jax.stages.Compiled``) on one device:
    arguments + outputs + temporaries − donated aliases; ``None`` where the backend gives no
    memory analysis."""
    try:
        m = compiled.memory_analysis()
    except Exception:  # noqa: BLE001 - a backend without the analysis
        return None
    if m is None:
        return None
    return int(m.argument_size_in_bytes + m.output_size_in_bytes + m.temp_size_in_bytes
               - m.alias_size_in_bytes)


def device_memory_limit(devices: Optional[Sequence[Any]] = None) -> Optional[int]:
    """The smallest ``memory_stats()['bytes_limit']`` of ``devices`` (default: this process's);
    ``None`` where the backend reports none (the CPU backend)."""
    devices = list(devices) if devices is not None else jax.local_devices()
    limits = []
    for d in devices:
        try:
            stats = d.memory_stats()
        except Exception:  # noqa: BLE001 - a backend without memory statistics
            stats = None
        if stats and stats.get("bytes_limit"):
            limits.append(int(stats["bytes_limit"]))
    return min(limits) if limits else None


def micro_batch_rows(config: Any) -> int:
    """Rows of the train step's micro-batch: ``train.batch_size / train.grad_accum_steps``."""
    return config.train.batch_size // config.train.grad_accum_steps


def eval_pieces(config: Any) -> int:
    """How many pieces the eval step computes its batch in, one after another: as many as
    hold the train step's micro-batch (:func:`micro_batch_rows`) each, where
    ``train.eval_batch_size`` is a multiple of it, else 1.  So evaluation needs no more
    activation memory than a training micro-batch's forward pass: with ``grad_accum_steps``
    chosen to fit, the eval batch fits too."""
    rows, micro = config.train.eval_batch_size, micro_batch_rows(config)
    return rows // micro if rows > micro and rows % micro == 0 else 1


def remedies(config: Any, program: str = "train step") -> list[str]:
    """What would shrink ``program`` (``"train step"`` or ``"eval step"``), leaving out what
    ``config`` (the run's ConfigDict) already does: the accumulation's micro-batches
    (activations ∝ 1/k), rematerialisation, the chunked loss (the (B, S, V) logits), FSDP
    (params and optimizer state ∝ 1/fsdp), a smaller batch."""
    m, t = config.model, config.train
    out = []
    if program == "eval step":
        micro = micro_batch_rows(config)
        if t.eval_batch_size > micro and eval_pieces(config) == 1:  # one piece: not a multiple
            out.append(f"train.eval_batch_size a multiple of the train step's micro-batch of "
                       f"{micro} rows, evaluated in pieces of it (now {t.eval_batch_size})")
        else:
            out.append(f"a smaller train.eval_batch_size (now {t.eval_batch_size})")
    else:
        k = t.grad_accum_steps
        out.append(f"train.grad_accum_steps={2 * k} (now {k}; it must divide the per-device "
                   "batch)")
        if m.remat != "full":
            out.append(f"model.remat=full (now {m.remat})")
    if m.loss_chunks == 1:
        out.append("model.loss_chunks=8 (or another divisor of model.seq_len)")
    if jax.device_count() > 1 and config.mesh.fsdp == 1:
        out.append("mesh.fsdp=<devices> (params and optimizer state split over devices)")
    if program != "eval step":
        out.append(f"a smaller train.batch_size (now {t.batch_size})")
    return out


def size(n: int) -> str:
    """``n`` bytes as ``"44.05 GiB"``, or in MiB under a GiB (``"1.25 MiB"``)."""
    return f"{n / GIB:.2f} GiB" if n >= GIB else f"{n / 2**20:.2f} MiB"


def describe(step_bytes: int, limit: Optional[int]) -> str:
    """``"XLA plans 44.05 GiB per device for the train step (59.25 GiB allowed: 74%)"``."""
    text = f"XLA plans {size(step_bytes)} per device for the train step"
    if limit is not None:
        text += f" ({size(limit)} allowed: {step_bytes / limit:.0%})"
    return text


def check_fits(step_bytes: Optional[int], limit: Optional[int], config: Any,
               program: str = "train step") -> None:
    """Raises :class:`StepMemoryError` if ``step_bytes`` (``program``'s plan) exceeds ``limit``
    (either unknown: nothing to check), naming both and :func:`remedies`."""
    if step_bytes is None or limit is None or step_bytes <= limit:
        return
    fraction = os.environ.get("XLA_PYTHON_CLIENT_MEM_FRACTION")
    allowed = (f"XLA_PYTHON_CLIENT_MEM_FRACTION={fraction}" if fraction else
               f"by default JAX's allocator takes {DEFAULT_GPU_MEM_FRACTION:.0%} of a GPU's "
               "memory; "
               "XLA_PYTHON_CLIENT_MEM_FRACTION=.9 allows more")
    raise StepMemoryError(
        f"the {program} does not fit: XLA plans {size(step_bytes)} per device, the allocator "
        f"allows {size(limit)} ({allowed}); to shrink it: " + "; ".join(remedies(config, program)))
