"""umup-jax: SP, μP and u-μP (Blake et al., ICLR 2025) for JAX/Flax."""

from umup_jax.model import Decoder, ModelConfig, init_params
from umup_jax.optim import OptimizerConfig, make_optimizer
from umup_jax.parametrization import (
    MuP,
    ParamMeta,
    SP,
    UMuP,
    make_parametrization,
    param_metadata,
    residual_taus,
)

__version__ = "0.1.0"
__all__ = [
    "Decoder",
    "ModelConfig",
    "MuP",
    "OptimizerConfig",
    "ParamMeta",
    "SP",
    "UMuP",
    "init_params",
    "make_optimizer",
    "make_parametrization",
    "param_metadata",
    "residual_taus",
]
