"""What defines a run: which config keys may change when a run resumes, and a run's hash.

A run is its config.  Most keys *define* it: the model's shapes, the parametrization and its
HPs, the optimizer HPs and schedule, the data and tokenizer, the seeds.  Changing any of them
and resuming the old checkpoint would train the old weights under a new label, so a resume
with such a change is refused (:func:`resume_diff`).  The rest only say *how* the same run is
executed or observed; they may change freely between a run and its resumption:

* :data:`EXECUTION_KEYS`: logging/evaluation/checkpoint cadence, the progress bar, the device
  mesh (checkpoints reshard on restore), multi-host settings, input prefetch depth, the cache
  directory and the restart switch itself; rematerialisation, the attention kernel, the
  loss chunks and gradient accumulation (each computes the same function and the same update,
  up to float rounding).  ``model.scan_layers`` is *not* among them: it changes the
  checkpoint's layout (convert one with :mod:`umup_jax.layer_stack`);
* ``train.steps`` may grow on resume (the run is continued; with the cosine schedule the decay
  is re-stretched to the new total from the resume point on, which the resume message says).

:func:`identity_hash` hashes everything but the execution keys, so two configs with the same
hash train the same thing and report the same numbers (sweeps use it for their base config).
"""

from __future__ import annotations

import fnmatch
import hashlib
import json
from typing import Any, Mapping

import ml_collections

# Keys (fnmatch patterns over dotted paths) that never change what a run computes.
EXECUTION_KEYS = (
    "train.log_every",
    "train.metrics_every",
    "train.eval_every",
    "train.checkpoint_every",
    "train.keep_checkpoints",
    "train.progress",
    "train.nan_policy",
    "train.restart",
    "data.prefetch",
    "data.cache_dir",
    "data.hf_streaming",  # the same tokens streamed or downloaded (tests/test_prepare_data.py)
    "mesh.*",
    "distributed.*",
    "model.remat",
    "model.attention_impl",
    "model.loss_chunks",
    "train.grad_accum_steps",
    "train.fsdp_gather_once",
    "train.fsdp_reduce_once",
)

# Keys that may change on resume in one direction only: (key, allowed change, explanation).
GROWABLE_KEYS = {"train.steps": "can only grow when a run resumes"}


class RunMismatchError(ValueError):
    """A workdir's checkpoints were made by a run with a different config."""


def flatten(config: Any, prefix: str = "") -> dict[str, Any]:
    """``{'a.b.c': value}`` for a ConfigDict or nested dict (JSON-normalised leaves)."""
    if isinstance(config, ml_collections.ConfigDict):
        config = json.loads(config.to_json())
    out: dict[str, Any] = {}
    for key, value in config.items():
        path = f"{prefix}{key}"
        if isinstance(value, Mapping):
            out.update(flatten(value, path + "."))
        else:
            out[path] = value
    return out


def is_execution_key(key: str) -> bool:
    return any(fnmatch.fnmatchcase(key, pattern) for pattern in EXECUTION_KEYS)


def identity(config: Any) -> dict[str, Any]:
    """The run-defining part of ``config``, flattened."""
    return {k: v for k, v in flatten(config).items() if not is_execution_key(k)}


def identity_hash(config: Any) -> str:
    """sha256 (16 hex digits) of :func:`identity`: equal for configs that train the same."""
    blob = json.dumps(identity(config), sort_keys=True, default=str)
    return hashlib.sha256(blob.encode()).hexdigest()[:16]


_ABSENT = "<absent>"


def diff(old: Any, new: Any, defaults: Any = None) -> list[tuple[str, Any, Any]]:
    """Sorted (key, old, new) for every key whose value differs.  A key present on one side
    only (a config written by another version) counts as unchanged when the other side holds
    its schema default (``defaults``), else it is reported with ``<absent>``."""
    a, b = flatten(old), flatten(new)
    d = flatten(defaults) if defaults is not None else {}
    out = []
    for key in sorted(set(a) | set(b)):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if va == vb:
            continue
        if va is _ABSENT and key in d and vb == d[key]:
            continue
        if vb is _ABSENT and key in d and va == d[key]:
            continue
        out.append((key, va, vb))
    return out


def resume_diff(old: Any, new: Any, defaults: Any = None
                ) -> tuple[list[tuple[str, Any, Any]], list[tuple[str, Any, Any]]]:
    """Splits :func:`diff` into (refused, allowed) changes for resuming a run made with
    ``old`` under ``new``: execution keys and growing ``train.steps`` are allowed."""
    refused, allowed = [], []
    for key, va, vb in diff(old, new, defaults):
        if is_execution_key(key):
            allowed.append((key, va, vb))
        elif key in GROWABLE_KEYS and _grows(va, vb):
            allowed.append((key, va, vb))
        else:
            refused.append((key, va, vb))
    return refused, allowed


def _grows(old: Any, new: Any) -> bool:
    try:
        return float(new) >= float(old)
    except (TypeError, ValueError):
        return False


def describe_change(key: str, old: Any, new: Any) -> str:
    line = f"{key}: {old!r} → {new!r}"
    if key in GROWABLE_KEYS and not _grows(old, new):
        line += f" ({key} {GROWABLE_KEYS[key]})"
    return line
