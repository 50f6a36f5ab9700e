"""Compile for an NVIDIA H100 on a machine without one (ahead of time, XLA's GPU compiler).

JAX's CUDA PJRT plugin can describe a GPU it does not have: given a device description (a
``GpuTargetConfigProto``, :data:`H100_SXM_TARGET_CONFIG`), ``jax.experimental.topologies``
returns abstract devices, and a function jitted with arguments placed on them is lowered and
compiled by XLA's real GPU pipeline (the FP8 GEMM rewrite, Triton GEMM fusions, the float
conversion simplifier, …) on the CPU.  Nothing runs and nothing is autotuned: where XLA would
time cuBLAS against Triton on the device, it takes its default instead.

What it is for: reading the compiled H100 program of a step (:mod:`umup_jax.hlo_check`: which
GEMMs take FP8 operands, per matmul group) and its memory plan before a GPU is at hand.
``tests/test_fp8_gpu.py`` runs its FP8 checks this way under ``-m gpu_aot``.

It needs the plugin of the installed JAX, kept off the normal path so that ordinary CPU runs
never load it (about 130 MB of wheels, no CUDA libraries needed)::

    V=$(python -c "import jax; print(jax.__version__)")
    pip install --no-deps --target .cuda-plugin "jax-cuda13-plugin==$V" "jax-cuda13-pjrt==$V"
    JAX_PLATFORMS=cpu PYTHONPATH=.cuda-plugin python …

``JAX_PLATFORMS=cpu`` keeps the plugin from looking for a GPU and CUDA's libraries; it still
registers the ``cuda`` platform that the abstract devices need.
"""

from __future__ import annotations

import functools
from typing import Any

import jax

from umup_jax import memory_plan

# The device an H100 SXM5 80GB HBM3 reports to XLA (compute capability 9.0, 132 SMs of 2048
# threads and 228 KiB of shared memory, 50 MiB of L2, 3.35 TB/s of HBM3 at a 1.98 GHz boost
# clock), with CUDA 13 and cuDNN 9.10.  XLA's GPU compiler reads the compute capability (which
# FP8 GEMMs and Triton features exist) and the sizes (fusion and tiling heuristics); the
# versions only gate cuBLASLt and cuDNN features.
H100_DEVICE_KIND = "NVIDIA H100 80GB HBM3"
H100_MEMORY_BYTES = 84942979072
# What JAX's allocator takes of it by default (memory_plan.DEFAULT_GPU_MEM_FRACTION, 59.3 GiB):
# the limit the trainer's memory check reads on such a device.
H100_ALLOCATOR_BYTES = int(memory_plan.DEFAULT_GPU_MEM_FRACTION * H100_MEMORY_BYTES)
H100_SXM_TARGET_CONFIG = """
gpu_device_info {
  threads_per_block_limit: 1024
  threads_per_warp: 32
  shared_memory_per_block: 49152
  shared_memory_per_core: 233472
  threads_per_core_limit: 2048
  core_count: 132
  fpus_per_core: 128
  block_dim_limit_x: 2147483647
  block_dim_limit_y: 65535
  block_dim_limit_z: 65535
  memory_bandwidth: 3352320000000
  l2_cache_size: 52428800
  clock_rate_ghz: 1.98
  device_memory_size: @MEMORY@
  shared_memory_per_block_optin: 232448
  cuda_compute_capability {
    major: 9
    feature_extension: ACCELERATED_FEATURES
  }
  registers_per_core_limit: 65536
  registers_per_block_limit: 65536
  device_vendor: "NVIDIA Corporation"
  platform_version: "Compute Capability 9.0a"
  name: "@KIND@"
  driver_version: "13.0.0"
  runtime_version: "13.0.0"
  compile_time_toolkit_version: "13.0.0"
  dnn_version: "9.10.0"
}
platform_name: "CUDA"
dnn_version_info {
  major: 9
  minor: 10
  patch: 0
}
device_description_str: "@KIND@"
""".replace("@MEMORY@", str(H100_MEMORY_BYTES)).replace("@KIND@", H100_DEVICE_KIND)


class GpuTargetUnavailable(RuntimeError):
    """The CUDA plugin that compiles for a GPU ahead of time is not importable here."""


def cuda_plugin_on_path() -> bool:
    """Whether a JAX CUDA plugin (``jax_plugins.xla_cuda13`` or ``xla_cuda12``) is importable,
    without importing it: where it is not, :func:`h100_devices` raises
    :class:`GpuTargetUnavailable`, naming the wheels."""
    import importlib.util

    return importlib.util.find_spec("jax_plugins") is not None and any(
        importlib.util.find_spec(f"jax_plugins.{name}") is not None
        for name in ("xla_cuda13", "xla_cuda12"))


@functools.lru_cache(maxsize=None)
def h100_devices(count: int = 1) -> tuple:
    """``count`` abstract H100s of one host (topology ``1x1x<count>``, one process, as on an
    8-GPU node): build a mesh of them (``umup_jax.train.build_run(config, devices=…)``) and
    ``.lower(…).compile()`` compiles the program XLA's SPMD partitioner makes for them,
    collectives included."""
    from jax.experimental import topologies

    try:
        topology = topologies.get_topology_desc(
            topology_name="h100", platform="cuda", target_config=H100_SXM_TARGET_CONFIG,
            topology=f"1x1x{count}")
    except Exception as e:  # noqa: BLE001 - the plugin's absence shows as several types
        raise GpuTargetUnavailable(
            f"compiling for an H100 without one needs JAX's CUDA PJRT plugin for jax "
            f"{jax.__version__} (pip install --no-deps --target DIR "
            f"jax-cuda13-plugin=={jax.__version__} jax-cuda13-pjrt=={jax.__version__}; then "
            f"JAX_PLATFORMS=cpu PYTHONPATH=DIR): {type(e).__name__}: {e}") from e
    return tuple(topology.devices[:count])


@functools.lru_cache(maxsize=None)
def h100_sharding() -> jax.sharding.NamedSharding:
    """A sharding onto one abstract H100: place a jitted function's arguments on it
    (:func:`abstract`) and ``.lower(…).compile()`` compiles the H100 program."""
    mesh = jax.sharding.Mesh(h100_devices(1), ("device",))
    return jax.sharding.NamedSharding(mesh, jax.sharding.PartitionSpec())


def abstract(tree: Any, sharding: jax.sharding.Sharding) -> Any:
    """Every array (or ``ShapeDtypeStruct``) leaf of ``tree`` as a ``ShapeDtypeStruct`` of its
    shape and dtype placed on ``sharding``."""
    return jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=sharding),
                        tree)
