"""A small hourglass transformer: neighborhood attention at the fine levels, global attention
at the coarse one (the layout of hourglass diffusion transformers), trained as a denoiser.

Fine levels are where tokens are many and global attention would cost ``O(tokens^2)``; there
each block uses :class:`nat_jax.layers.NeighborhoodAttention2D` (a dilated one on the second
level, as DiNAT does, for a larger receptive field at the same cost). The coarsest level is
small enough for plain global attention (``nnx.MultiHeadAttention``). Levels are joined by
2x2 token merging on the way down and a linear 2x2 split plus a learned skip on the way up.

The task is synthetic so the example runs anywhere in seconds: images are random smooth
blobs, the input adds Gaussian noise, and the model predicts the clean image.

Usage::

    python examples/hourglass.py                 # 200 steps, prints the loss
    python examples/hourglass.py --steps 50 --size 64 --backend xla
"""

from __future__ import annotations

import argparse
import sys

import flax.nnx as nnx
import jax
import jax.numpy as jnp
import optax

from nat_jax.layers import NeighborhoodAttention2D


class Mlp(nnx.Module):
    def __init__(self, dim: int, *, rngs: nnx.Rngs):
        self.fc1 = nnx.Linear(dim, 4 * dim, rngs=rngs)
        self.fc2 = nnx.Linear(4 * dim, dim, rngs=rngs)

    def __call__(self, x):
        return self.fc2(jax.nn.gelu(self.fc1(x)))


class NABlock(nnx.Module):
    """Pre-norm neighborhood attention + MLP on a ``[B, H, W, C]`` map."""

    def __init__(self, dim: int, heads: int, kernel: int, dilation: int, backend: str, *,
                 rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = NeighborhoodAttention2D(dim, heads, kernel, dilation=dilation, rpb=True,
                                            backend=backend, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = Mlp(dim, rngs=rngs)

    def __call__(self, x):
        x = x + self.attn(self.norm1(x))
        return x + self.mlp(self.norm2(x))


class GlobalBlock(nnx.Module):
    """Pre-norm global self-attention + MLP over every token of a ``[B, H, W, C]`` map."""

    def __init__(self, dim: int, heads: int, *, rngs: nnx.Rngs):
        self.norm1 = nnx.LayerNorm(dim, rngs=rngs)
        self.attn = nnx.MultiHeadAttention(heads, dim, decode=False, rngs=rngs)
        self.norm2 = nnx.LayerNorm(dim, rngs=rngs)
        self.mlp = Mlp(dim, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        t = self.norm1(x).reshape(b, h * w, c)
        x = x + self.attn(t).reshape(b, h, w, c)
        return x + self.mlp(self.norm2(x))


class Merge(nnx.Module):
    """2x2 tokens -> one token with ``dout`` channels (``[B, H, W, C] -> [B, H/2, W/2, dout]``)."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(4 * din, dout, rngs=rngs)

    def __call__(self, x):
        b, h, w, c = x.shape
        x = x.reshape(b, h // 2, 2, w // 2, 2, c).transpose(0, 1, 3, 2, 4, 5)
        return self.proj(x.reshape(b, h // 2, w // 2, 4 * c))


class Split(nnx.Module):
    """One token -> 2x2 tokens with ``dout`` channels (``[B, H, W, C] -> [B, 2H, 2W, dout]``)."""

    def __init__(self, din: int, dout: int, *, rngs: nnx.Rngs):
        self.proj = nnx.Linear(din, 4 * dout, rngs=rngs)

    def __call__(self, x):
        b, h, w, _ = x.shape
        y = self.proj(x).reshape(b, h, w, 2, 2, -1).transpose(0, 1, 3, 2, 4, 5)
        return y.reshape(b, 2 * h, 2 * w, -1)


class Hourglass(nnx.Module):
    """Pixels ``[B, S, S, channels]`` -> same shape. Levels at S/2 (NA, K=7), S/4 (NA, K=7,
    dilation 2) and S/8 (global attention)."""

    def __init__(self, channels: int = 3, dim: int = 32, backend: str = "auto", *,
                 rngs: nnx.Rngs):
        self.embed = Merge(channels, dim, rngs=rngs)
        self.down0 = NABlock(dim, 2, 7, 1, backend, rngs=rngs)
        self.merge1 = Merge(dim, 2 * dim, rngs=rngs)
        self.down1 = NABlock(2 * dim, 4, 7, 2, backend, rngs=rngs)
        self.merge2 = Merge(2 * dim, 4 * dim, rngs=rngs)
        self.middle = nnx.List([GlobalBlock(4 * dim, 4, rngs=rngs) for _ in range(2)])
        self.split2 = Split(4 * dim, 2 * dim, rngs=rngs)
        self.skip1 = nnx.Linear(4 * dim, 2 * dim, rngs=rngs)
        self.up1 = NABlock(2 * dim, 4, 7, 2, backend, rngs=rngs)
        self.split1 = Split(2 * dim, dim, rngs=rngs)
        self.skip0 = nnx.Linear(2 * dim, dim, rngs=rngs)
        self.up0 = NABlock(dim, 2, 7, 1, backend, rngs=rngs)
        self.out = Split(dim, channels, rngs=rngs)

    def __call__(self, x):
        h0 = self.down0(self.embed(x))
        h1 = self.down1(self.merge1(h0))
        m = self.merge2(h1)
        for block in self.middle:
            m = block(m)
        u1 = self.up1(self.skip1(jnp.concatenate([self.split2(m), h1], -1)))
        u0 = self.up0(self.skip0(jnp.concatenate([self.split1(u1), h0], -1)))
        return self.out(u0)


def blobs(key: jax.Array, batch: int, size: int, channels: int = 3) -> jax.Array:
    """Random smooth images: a few Gaussian blobs per channel, values in about [-1, 1]."""
    kc, kw, ka = jax.random.split(key, 3)
    centers = jax.random.uniform(kc, (batch, channels, 4, 2), minval=0.0, maxval=size)
    widths = jax.random.uniform(kw, (batch, channels, 4, 1, 1), minval=2.0, maxval=size / 4)
    amps = jax.random.uniform(ka, (batch, channels, 4, 1, 1), minval=-1.0, maxval=1.0)
    grid = jnp.arange(size, dtype=jnp.float32)
    dy = grid[:, None] - centers[..., 0, None, None]
    dx = grid[None, :] - centers[..., 1, None, None]
    img = jnp.sum(amps * jnp.exp(-(dy ** 2 + dx ** 2) / (2 * widths ** 2)), axis=2)
    return jnp.transpose(img, (0, 2, 3, 1))


def train(steps: int = 200, size: int = 56, batch: int = 8, noise: float = 0.3,
          backend: str = "auto", seed: int = 0, log_every: int = 25) -> list[float]:
    """Train the denoiser; returns the loss of every step."""
    model = Hourglass(backend=backend, rngs=nnx.Rngs(seed))
    optimizer = nnx.Optimizer(model, optax.adamw(2e-3), wrt=nnx.Param)

    @nnx.jit
    def step(model, optimizer, key):
        kb, kn = jax.random.split(key)
        clean = blobs(kb, batch, size)
        noisy = clean + noise * jax.random.normal(kn, clean.shape)

        def loss_fn(model):
            return jnp.mean((model(noisy) - clean) ** 2)

        loss, grads = nnx.value_and_grad(loss_fn)(model)
        optimizer.update(model, grads)
        return loss

    losses = []
    key = jax.random.key(seed)
    for i in range(steps):
        key, sub = jax.random.split(key)
        losses.append(float(step(model, optimizer, sub)))
        if log_every and (i % log_every == 0 or i == steps - 1):
            print(f"step {i:4d}  loss {losses[-1]:.4f}", flush=True)
    return losses


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--steps", type=int, default=200)
    parser.add_argument("--size", type=int, default=56,
                        help="image side; a multiple of 8 with size/4 >= 14 (K=7, dilation 2)")
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--backend", default="auto", help="NA backend")
    args = parser.parse_args(argv)
    if args.size % 8 or args.size // 4 < 14:
        parser.error(f"--size {args.size}: must be a multiple of 8 and at least 56")
    losses = train(args.steps, args.size, args.batch, backend=args.backend)
    print(f"loss {losses[0]:.4f} -> {losses[-1]:.4f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
