"""Neighborhood attention ops (``nat_jax.kernels``).

Public surface: ``na1d/na2d/na3d`` (fused; ``additional_keys``/``additional_values`` for extra
global tokens), ``merge_attentions``, ``na{1,2,3}d_qk`` / ``na{1,2,3}d_av`` (unfused pieces
for attention weights), the backend table (:class:`Backend`, ``available_backends``,
``register_backend``, ``resolve_backend``), the platforms ``auto`` prepares calls for
(``target_platforms``, ``lowering_platforms``), :class:`NAParams` and ``na_flops``. The backends
(``reference``, ``xla``, ``pallas``, ``pallas_tpu``) are listed in :mod:`nat_jax.kernels.ops`; importing a module
never registers anything.
"""

from nat_jax.kernels.merge import merge_attentions
from nat_jax.kernels.ops import (Backend, available_backends, lowering_platforms, na1d, na1d_av,
                                 na1d_qk, na2d, na2d_av, na2d_qk, na3d, na3d_av, na3d_qk,
                                 neighborhood_attention, register_backend, resolve_backend,
                                 target_platforms)
from nat_jax.kernels.params import NAParams, make_params
from nat_jax.kernels.windows import na_flops

__all__ = [
    "Backend", "NAParams", "available_backends", "lowering_platforms", "make_params",
    "merge_attentions", "na1d",
    "na1d_av", "na1d_qk", "na2d", "na2d_av", "na2d_qk", "na3d", "na3d_av", "na3d_qk", "na_flops",
    "neighborhood_attention", "register_backend", "resolve_backend", "target_platforms",
]
