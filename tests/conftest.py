"""Shared test helpers (the authors' conventions, spec §10.1): fixed seed 1472, unit-ness as
|std − 1| ≤ 0.1 unless a test states otherwise."""

import os

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

import jax
import numpy as np
import pytest

SEED = 1472


def std(x) -> float:
    return float(np.std(np.asarray(x, dtype=np.float64)))


def rms(x) -> float:
    return float(np.sqrt(np.mean(np.square(np.asarray(x, dtype=np.float64)))))


def unit_backward(fn, *args, key=None):
    """Runs ``fn(*args)`` and back-propagates a fresh N(0, 1) cotangent; returns (y, grads)."""
    key = jax.random.key(SEED + 1) if key is None else key
    y, vjp = jax.vjp(fn, *args)
    leaves, tree = jax.tree.flatten(y)
    keys = jax.random.split(key, len(leaves))
    cot = jax.tree.unflatten(
        tree, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
    )
    return y, vjp(cot)


def assert_unit(*tensors, tol=0.1, stat=std):
    for i, t in enumerate(tensors):
        value = stat(t)
        assert abs(value - 1.0) <= tol, f"tensor {i}: {stat.__name__} {value:.4f} not within {tol} of 1"


def assert_scale(*tensors, target, tol=0.1, stat=std):
    for i, t in enumerate(tensors):
        value = stat(t)
        assert abs(value - target) <= tol, f"tensor {i}: {stat.__name__} {value:.4f} != {target:.4f} ± {tol}"


def assert_not_unit(*tensors, tol=0.1, stat=std):
    for i, t in enumerate(tensors):
        value = stat(t)
        assert abs(value - 1.0) > tol, f"tensor {i}: {stat.__name__} {value:.4f} unexpectedly unit"


@pytest.fixture
def keys():
    return jax.random.split(jax.random.key(SEED), 8)
