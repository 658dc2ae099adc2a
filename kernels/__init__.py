"""Neighborhood attention ops (``nat_jax.kernels``).

Public surface: ``na1d/na2d/na3d`` (fused), ``na{1,2,3}d_qk`` / ``na{1,2,3}d_av`` (unfused pieces
for attention weights), backend registry helpers, and :class:`NAParams`.
"""

from nat_jax.kernels.ops import (available_backends, na1d, na1d_av, na1d_qk, na2d, na2d_av,
                                 na2d_qk, na3d, na3d_av, na3d_qk, neighborhood_attention,
                                 register_backend, resolve_backend)
from nat_jax.kernels.params import NAParams, make_params
from nat_jax.kernels.windows import na_flops
from nat_jax.kernels import pallas as _pallas  # noqa: E402,F401  (registers backend "pallas")
from nat_jax.kernels import pallas_tpu as _pallas_tpu  # noqa: E402,F401  (backend "pallas_tpu")

__all__ = [
    "NAParams", "available_backends", "make_params", "na1d", "na1d_av", "na1d_qk", "na2d",
    "na2d_av", "na2d_qk", "na3d", "na3d_av", "na3d_qk", "na_flops", "neighborhood_attention",
    "register_backend", "resolve_backend",
]
