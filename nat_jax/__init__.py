"""nat-jax: Neighborhood Attention Transformers (NAT, DiNAT) in JAX/Flax."""

from nat_jax.kernels import (na1d, na1d_av, na1d_qk, na2d, na2d_av, na2d_qk, na3d, na3d_av,
                             na3d_qk)

__version__ = "0.1.0"

__all__ = ["na1d", "na1d_av", "na1d_qk", "na2d", "na2d_av", "na2d_qk", "na3d", "na3d_av",
           "na3d_qk"]
