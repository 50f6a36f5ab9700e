"""GPU-only: the compiled HLO holds a real FP8 GEMM (fp8 operands in the cuBLASLt call)."""

import jax
import jax.numpy as jnp
import pytest

from umup_jax import fp8

pytestmark = pytest.mark.gpu


@pytest.mark.skipif(jax.default_backend() != "gpu",
                    reason="needs a CUDA GPU (FP8 GEMMs are lowered to cuBLASLt only there)")
def test_compiled_hlo_has_fp8_gemm():
    x = jnp.ones((256, 512), jnp.bfloat16)
    w = jnp.ones((512, 256), jnp.bfloat16)
    fwd = jax.jit(lambda x, w: fp8.fp8_dot(x, w)).lower(x, w).compile().as_text()
    assert "f8e4m3fn" in fwd.lower() and "cublas" in fwd.lower()
    grad = jax.jit(jax.grad(lambda x, w: fp8.fp8_dot(x, w).astype(jnp.float32).sum(),
                            argnums=(0, 1))).lower(x, w).compile().as_text().lower()
    assert "f8e5m2" in grad and "cublas" in grad
