"""The cpu backend (native XLA FFI kernels, ``kernels/cpu.py``): how it is built, chosen and
composed. Its numerics run in the shared NA suites (``test_na_ops.py``, ``test_na_features.py``,
``test_nonfinite.py``, ``test_na_extra_tokens.py``), which list it among their backends."""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import numpy as np

import jax
import jax.numpy as jnp

from nat_jax import kernels
from nat_jax.kernels import cpu, ops, reference

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _inputs(rng, shape, heads=2, heads_kv=None, head_dim=8, kernel=3):
    heads_kv = heads_kv or heads
    q = jnp.asarray(rng.standard_normal((2, *shape, heads, head_dim)), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal((2, *shape, heads_kv, head_dim)), jnp.float32)
            for _ in range(2))
    rpb = jnp.asarray(rng.standard_normal((heads, *(2 * kernel - 1 for _ in shape))),
                      jnp.float32)
    return q, k, v, rpb


def test_auto_picks_the_cpu_kernels_on_cpu(rng):
    assert cpu.build_error() is None
    q, k, v, rpb = _inputs(rng, (9, 8))
    p = kernels.make_params((9, 8), 8, 3)
    assert ops.resolve_backend("auto", q, k, v, p, rpb) == "cpu"
    # Accelerators keep their own choices; the cpu kernels are never lowered for them.
    assert ops.resolve_backend("auto", q, k, v, p, rpb, platform="tpu") != "cpu"


def test_integer_inputs_are_refused_by_name(rng):
    q, k, v, _ = _inputs(rng, (9, 8))
    p = kernels.make_params((9, 8), 8, 3)
    why = cpu.unsupported(q.astype(jnp.int32), v, p, None)
    assert why is not None and "query.dtype=int32" in why


def test_jit_grad_vmap_compose(rng):
    """vmap over an extra leading axis (the custom call runs once per element) agrees with a
    loop, forward and gradients, with RPB and grouped-query attention."""
    q, k, v, rpb = _inputs(rng, (7, 9), heads=4, heads_kv=2)
    qs, ks, vs = (jnp.stack([x, x[::-1] * 0.5]) for x in (q, k, v))

    def loss(q, k, v, rpb):
        out = kernels.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend="cpu")
        return jnp.sum(out ** 2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
    batched = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1, 2, 3)), in_axes=(0, 0, 0, None)))
    got = batched(qs, ks, vs, rpb)
    for i in range(2):
        want = grad(qs[i], ks[i], vs[i], rpb)
        for g, w in zip(got, want):
            np.testing.assert_allclose(np.asarray(g[i]), np.asarray(w), rtol=1e-6, atol=1e-6)


def test_sharded_batch_and_heads_match_one_device(rng):
    """Under a mesh the custom call runs per device in shard_map (XLA cannot partition it)."""
    devices = np.array(jax.devices()[:4]).reshape(2, 2)
    mesh = jax.sharding.Mesh(devices, ("data", "model"))
    q, k, v, rpb = _inputs(rng, (10, 9), heads=4)

    def loss(q, k, v, rpb):
        return jnp.sum(kernels.na2d(q, k, v, 3, rpb=rpb, backend="cpu") ** 2)

    want = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, rpb)
    spec = jax.sharding.NamedSharding(mesh, jax.P("data", None, None, "model", None))
    args = [jax.device_put(x, spec) for x in (q, k, v)] + [rpb]
    with jax.set_mesh(mesh):
        got = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(*args)
    for g, w in zip(jax.tree.leaves(got), jax.tree.leaves(want)):
        np.testing.assert_allclose(np.asarray(g), np.asarray(w), rtol=2e-5, atol=2e-5)


def test_large_windows_and_long_axes_match_the_reference(rng):
    """Windows past the kernels' vector widths, and a 1-D axis far longer than the chunking."""
    for shape, kernel, kw in [((33, 40), (13, 9), dict(dilation=(2, 3))),
                              ((1000,), (31,), dict(is_causal=True)),
                              ((16, 16), (16, 16), {})]:
        q, k, v, _ = _inputs(rng, shape, head_dim=40, kernel=3)
        p = kernels.make_params(shape, 40, kernel, **kw)
        out, lse = jax.jit(lambda q, k, v: cpu.na_fused(q, k, v, p))(q, k, v)
        want, want_lse = reference.na_fused(q, k, v, p)
        np.testing.assert_allclose(np.asarray(out), np.asarray(want), rtol=1e-5, atol=2e-5)
        np.testing.assert_allclose(np.asarray(lse), np.asarray(want_lse), rtol=1e-5, atol=2e-5)


def _run(code: str, env: dict, timeout: int = 300) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=timeout)


_PROBE = """
    import jax, jax.numpy as jnp
    from nat_jax import kernels
    from nat_jax.kernels import cpu, ops
    q = jnp.ones((1, 6, 6, 1, 4))
    p = kernels.make_params((6, 6), 4, 3)
    print("why:", cpu.build_error())
    print("auto:", ops.resolve_backend("auto", q, q, q, p, None))
    out = kernels.na2d(q, q, q, 3)
    print("ok:", float(out.sum()))
"""


def test_without_a_compiler_auto_keeps_the_xla_path(tmp_path):
    env = dict(os.environ, CXX=str(tmp_path / "no-such-compiler"),
               NAT_JAX_CACHE=str(tmp_path / "cache"), JAX_PLATFORMS="cpu")
    done = _run(_PROBE + """
    try:
        kernels.na2d(q, q, q, 3, backend="cpu")
    except ValueError as e:
        print("named:", e)
    """, env)
    assert done.returncode == 0, done.stderr
    assert "why: the cpu backend needs a C++ compiler" in done.stdout
    assert "auto: xla" in done.stdout
    assert "ok: 144.0" in done.stdout
    assert "named: backend='cpu': the cpu backend needs a C++ compiler" in done.stdout


def test_concurrent_first_builds_share_one_cache(tmp_path):
    """Two processes building into an empty cache at once both get a working library (each
    compiles to a temporary name and renames), and leave exactly one file behind."""
    env = dict(os.environ, NAT_JAX_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    code = textwrap.dedent(_PROBE)
    procs = [subprocess.Popen([sys.executable, "-c", code], cwd=ROOT, env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    try:
        results = [p.communicate(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    for p, (out, err) in zip(procs, results):
        assert p.returncode == 0, err
        assert "why: None" in out and "auto: cpu" in out and "ok: 144.0" in out
    assert [f.name for f in (tmp_path / "cpu_kernels").iterdir()] == \
        [f.name for f in (tmp_path / "cpu_kernels").glob("na-*.so")]
    assert len(list((tmp_path / "cpu_kernels").iterdir())) == 1


def test_a_source_that_does_not_compile_is_reported(tmp_path, monkeypatch):
    """A compile error names the compiler and carries its message; nothing half-written is left
    in the cache."""
    bad = tmp_path / "bad.cc"
    bad.write_text("this is not C++\n")
    monkeypatch.setattr(cpu, "_SOURCE", str(bad))
    monkeypatch.setenv("NAT_JAX_CACHE", str(tmp_path / "cache"))
    cpu._library.cache_clear()
    try:
        why = cpu.build_error()
    finally:
        cpu._library.cache_clear()
    assert why is not None and "did not compile" in why and "error" in why
    assert not list((tmp_path / "cache" / "cpu_kernels").iterdir())
    monkeypatch.undo()
    assert cpu.build_error() is None


def test_an_unwritable_cache_is_reported(tmp_path, monkeypatch):
    """A cache root that cannot hold the library (here a file) names the path; auto then keeps
    the xla path instead of failing."""
    blocker = tmp_path / "not-a-directory"
    blocker.write_text("")
    monkeypatch.setenv("NAT_JAX_CACHE", str(blocker))
    cpu._library.cache_clear()
    try:
        why = cpu.build_error()
        q = jnp.ones((1, 6, 6, 1, 4))
        p = kernels.make_params((6, 6), 4, 3)
        assert ops.resolve_backend("auto", q, q, q, p, None) == "xla"
    finally:
        cpu._library.cache_clear()
    assert why is not None and "could not be built" in why and str(blocker) in why


def test_results_do_not_depend_on_the_thread_count(rng, monkeypatch):
    """Work is cut into chunks by the problem size alone, and per-chunk RPB gradients are added
    in chunk order: one thread and three give the same bits."""
    q, k, v, rpb = _inputs(rng, (23, 19), heads=2)

    def run():
        def loss(q, k, v, rpb):
            out, lse = kernels.na2d(q, k, v, 3, dilation=(2, 1), rpb=rpb, backend="cpu",
                                    return_lse=True)
            return jnp.sum(out * q) + jnp.sum(lse)

        return jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2, 3)))(q, k, v, rpb)

    results = []
    for threads in ("1", "3"):
        monkeypatch.setenv("NAT_JAX_CPU_THREADS", threads)
        jax.clear_caches()
        results.append(jax.tree.leaves(run()))
    for a, b in zip(*results):
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
