"""Shared test helpers (the authors' conventions, spec §10.1): fixed seed 1472, unit-ness as
|std − 1| ≤ 0.1 unless a test states otherwise."""

import atexit
import os
import shutil
import tempfile

# Tests run on the CPU; keep XLA from grabbing every core's worth of threads per process.
os.environ.setdefault("JAX_PLATFORMS", "cpu")

# Many tests compile the same program: the smoke model's train step in CLI runs, resumed runs,
# sweep workers (Ray's too) and notebooks, each in its own process.  One persistent XLA cache per
# pytest session (a fresh directory, removed at exit; subprocesses inherit it through the
# environment) compiles each of them once: the default suite took 722 s instead of 921 s on 2
# cores.  A cached executable is the binary the same compile made, so results stay bit-exact.
# A size limit turns on JAX's file lock, so a process never reads an entry another is writing.
# Only programs that take 0.1 s or more to compile are written: with that lock, each write lists
# and stats the whole directory, so the thousands of single-op programs that eager code compiles
# in 10-50 ms each made every later write slower (test_ops.py and test_extra_ops.py in one
# process: 72 s writing everything, 628 entries; 49 s with the threshold, 92 entries).
# CPU only: the GPU tests read the HLO of their own compiles.  Set JAX_COMPILATION_CACHE_DIR to
# use a cache of your own, or UMUP_TEST_XLA_CACHE=0 for none.
if (os.environ["JAX_PLATFORMS"] == "cpu" and "JAX_COMPILATION_CACHE_DIR" not in os.environ
        and os.environ.get("UMUP_TEST_XLA_CACHE", "1") != "0"):
    _xla_cache = tempfile.mkdtemp(prefix="umup-jax-tests-xla-cache-")
    atexit.register(shutil.rmtree, _xla_cache, ignore_errors=True)
    os.environ["JAX_COMPILATION_CACHE_DIR"] = _xla_cache
    os.environ.setdefault("JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS", "0.1")
    os.environ.setdefault("JAX_COMPILATION_CACHE_MAX_SIZE", str(8 << 30))

# LLVM at -O1 instead of XLA's default -O2 for the CPU backend: the suite's programs are small
# and compiled once or twice each, so compile time dominates their run time.  On 2 cores the
# default suite took 549 s instead of 724 s (user CPU 876 s instead of 1192 s); -O0 was slower
# than either (815 s: unoptimised kernels run too long).  It is the level XLA's CPU backend
# gives LLVM for the code it emits; every comparison in the suite is between programs compiled
# alike.  Subprocesses inherit it; a level of your own in XLA_FLAGS wins, UMUP_TEST_XLA_OPT=0
# leaves XLA's default.
if (os.environ["JAX_PLATFORMS"] == "cpu" and os.environ.get("UMUP_TEST_XLA_OPT", "1") != "0"
        and "xla_backend_optimization_level" not in os.environ.get("XLA_FLAGS", "")):
    os.environ["XLA_FLAGS"] = (
        os.environ.get("XLA_FLAGS", "") + " --xla_backend_optimization_level=1").strip()


def xla_flags(*flags: str) -> str:
    """The session's XLA_FLAGS (the optimisation level above) with ``flags`` added, for the
    environment of a subprocess that needs more, e.g. forced host devices; a flag given here
    replaces the session's flag of the same name."""
    by_name = {f.split("=", 1)[0]: f for f in os.environ.get("XLA_FLAGS", "").split()}
    by_name.update({f.split("=", 1)[0]: f for f in flags})
    return " ".join(by_name.values())


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

    def forward_backward(args, key):
        y, vjp = jax.vjp(fn, *args)
        leaves, tree = jax.tree.flatten(y)
        keys = jax.random.split(key, len(leaves))
        cot = jax.tree.unflatten(
            tree, [jax.random.normal(k, leaf.shape, leaf.dtype) for k, leaf in zip(keys, leaves)]
        )
        return y, vjp(cot)

    # Jitted: one compile instead of one per op run eagerly.
    return jax.jit(forward_backward)(args, key)


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
