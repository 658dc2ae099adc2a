"""Combining attention over disjoint key sets, and the extra global tokens built on it.

Softmax attention over a key set ``A | B`` is a weighted mean of the attention over ``A`` and
over ``B``: with ``lse_A``, ``lse_B`` the logsumexps of each part's logits,
``lse = log(exp(lse_A) + exp(lse_B))`` and ``out = exp(lse_A - lse) out_A + exp(lse_B - lse)
out_B``. :func:`merge_attentions` does this for any number of parts; it is differentiable
(gradients flow to every part's output *and* logsumexp, which the NA ops' ``return_lse``
backward passes take), so a neighborhood and a set of global tokens, or the pieces of a
sequence split over devices, train as one attention.

:func:`extra_attention` is the global-token part of ``additional_keys`` / ``additional_values``
(NATTEN 0.21's arguments of the same name): every query attends to the same few extra tokens
(text tokens beside image tokens, register tokens), densely.
"""

from __future__ import annotations

from collections.abc import Sequence

import jax
import jax.numpy as jnp


def merge_attentions(outputs: Sequence[jax.Array], lses: Sequence[jax.Array]
                     ) -> tuple[jax.Array, jax.Array]:
    """Merge attention results computed over disjoint key sets into the attention over their
    union.

    Args:
      outputs: one ``[..., heads, head_dim_v]`` array per part (e.g. ``[batch, *spatial,
        heads, head_dim_v]``), all of one shape and dtype.
      lses: the matching float logsumexps ``[..., heads]`` (natural log, of the *scaled* logits,
        as the ops return with ``return_lse=True``). ``-inf`` marks a query with no key in that
        part.

    Returns:
      ``(output, lse)``: ``output`` in the parts' dtype, ``lse`` float32. A query with no key in
      any part gets output 0 and lse ``-inf``.

    Raises:
      ValueError: on fewer than one part, or shapes that do not match.
    """
    if len(outputs) < 1 or len(outputs) != len(lses):
        raise ValueError(f"merge_attentions: got {len(outputs)} outputs and {len(lses)} lses; "
                         "expected one lse per output, at least one of each")
    shape, dtype = outputs[0].shape, outputs[0].dtype
    for i, (o, l) in enumerate(zip(outputs, lses)):
        if o.shape != shape or o.dtype != dtype:
            raise ValueError(f"outputs[{i}] is {o.dtype}{list(o.shape)}; outputs[0] is "
                             f"{dtype}{list(shape)}: every part must match")
        if tuple(l.shape) != tuple(shape[:-1]):
            raise ValueError(f"lses[{i}].shape={tuple(l.shape)} must be the output's shape "
                             f"without head_dim, {tuple(shape[:-1])}")
    lse = jnp.stack([l.astype(jnp.float32) for l in lses])  # [parts, ...]
    # The shift only keeps exp() in range; it cancels, so it carries no gradient.
    m = jax.lax.stop_gradient(jnp.max(lse, axis=0))
    m = jnp.where(jnp.isfinite(m), m, 0.0)
    w = jnp.exp(lse - m)
    total = jnp.sum(w, axis=0)
    merged_lse = m + jnp.log(total)
    safe = jnp.where(total > 0, total, 1.0)
    out = sum((w[i] / safe)[..., None] * o.astype(jnp.float32) for i, o in enumerate(outputs))
    return out.astype(dtype), merged_lse


def check_additional(query: jax.Array, value: jax.Array, additional_keys, additional_values
                     ) -> None:
    """Shapes and dtypes of the extra tokens against the NA call's query and value."""
    if (additional_keys is None) != (additional_values is None):
        raise ValueError("additional_keys and additional_values go together: pass both or "
                         "neither")
    if additional_keys is None:
        return
    k, v = additional_keys, additional_values
    b, heads, d, dv = query.shape[0], query.shape[-2], query.shape[-1], value.shape[-1]
    if k.ndim != 4 or k.shape[0] != b or k.shape[-1] != d or k.shape[1] < 1:
        raise ValueError(f"additional_keys.shape={tuple(k.shape)} must be [batch={b}, "
                         f"extra tokens >= 1, heads_kv, head_dim={d}]")
    if v.shape[:-1] != k.shape[:-1] or v.shape[-1] != dv:
        raise ValueError(f"additional_values.shape={tuple(v.shape)} must be "
                         f"{(*k.shape[:-1], dv)} (additional_keys' shape with value's "
                         "head_dim)")
    if heads % k.shape[2]:
        raise ValueError(f"additional_keys heads={k.shape[2]}: query heads={heads} must be a "
                         "multiple of them (query head i uses extra head i // (heads // "
                         "heads_kv))")
    for name, x in (("additional_keys", k), ("additional_values", v)):
        if x.dtype != query.dtype:
            raise ValueError(f"{name}.dtype={x.dtype} must equal query.dtype={query.dtype}")


def extra_logits(query: jax.Array, keys: jax.Array, scale: float) -> jax.Array:
    """Scaled float32 logits of every query against the extra tokens: ``query [batch,
    *spatial, heads, head_dim]``, ``keys [batch, extra, heads_kv, head_dim]`` -> ``[batch,
    *spatial, heads, extra]`` (query head ``i`` against key head ``i // (heads // heads_kv)``;
    the keys are never repeated per query head)."""
    b, heads, d = query.shape[0], query.shape[-2], query.shape[-1]
    hk = keys.shape[2]
    q = query.reshape(b, -1, hk, heads // hk, d)  # [B, N, hk, group, d]
    s = jnp.einsum("bnkgd,blkd->bnkgl", q, keys, preferred_element_type=jnp.float32) * scale
    return s.reshape(*query.shape[:-1], keys.shape[1])


def extra_weighted_sum(weights: jax.Array, values: jax.Array) -> jax.Array:
    """``weights [batch, *spatial, heads, extra]`` times ``values [batch, extra, heads_kv,
    head_dim_v]`` -> ``[batch, *spatial, heads, head_dim_v]`` in ``values.dtype`` (the
    counterpart of :func:`extra_logits`)."""
    b, heads, n_extra = weights.shape[0], weights.shape[-2], weights.shape[-1]
    hk = values.shape[2]
    w = weights.reshape(b, -1, hk, heads // hk, n_extra).astype(values.dtype)
    out = jnp.einsum("bnkgl,blkd->bnkgd", w, values, preferred_element_type=jnp.float32)
    return out.astype(values.dtype).reshape(*weights.shape[:-1], values.shape[-1])


@jax.jit
def _extra(query, keys, values, scale):
    s = extra_logits(query, keys, scale)
    m = jax.lax.stop_gradient(jnp.max(s, axis=-1, keepdims=True))
    lse = m + jnp.log(jnp.sum(jnp.exp(s - m), axis=-1, keepdims=True))
    return extra_weighted_sum(jnp.exp(s - lse), values), lse[..., 0]


def extra_attention(query: jax.Array, keys: jax.Array, values: jax.Array, scale: float
                    ) -> tuple[jax.Array, jax.Array]:
    """Every query attends densely to the same extra tokens.

    Args:
      query: ``[batch, *spatial, heads, head_dim]``.
      keys: ``[batch, extra, heads_kv, head_dim]``; ``heads_kv`` divides ``heads`` (query head
        ``i`` uses extra head ``i // (heads // heads_kv)``).
      values: ``[batch, extra, heads_kv, head_dim_v]``.
      scale: multiplies ``q . k`` (as the neighborhood part's).

    Returns:
      ``(out [batch, *spatial, heads, head_dim_v]`` in ``values.dtype``, ``lse [batch,
      *spatial, heads]`` float32): logits and softmax in float32. Memory ``O(tokens * heads *
      extra)`` for the logits.
    """
    return _extra(query, keys, values, jnp.float32(scale))
