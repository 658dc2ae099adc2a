"""Context parallelism: NA with spatial axes split over 8 CPU devices (``spatial_axes=``).

Three independent checks:
* the exchange plans, against the float64 oracle's own window rules (no ``kernels`` code):
  the keys each shard holds give every one of its queries exactly its global window;
* the sharded op against the unsharded op, forward and gradients (q, k, v, rpb), over 1-D,
  2-D and 3-D grids split over one and two mesh axes, with batch sharding beside them;
* the sharded forward against the float64 oracle, and the compiled program's collectives
  (collective-permutes, no all-gather of a spatial axis).
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding, PartitionSpec as P

import oracle
from nat_jax.kernels import context, na1d, na2d, na3d, neighborhood_attention

# ------------------------------------------------------------------ plans vs the oracle


def _local_windows_ok(length, shards, kernel, stride, dilation, causal, periodic):
    """Every query of every shard sees its global window (oracle) when NA runs over the
    plan's local range with the local rules (oracle again, on the local length)."""
    plan = context.plan_axis(length, shards, kernel, stride, dilation, causal, periodic)
    m = length // shards
    for i in range(shards):
        first = i * m - plan.starts[i]
        local_periodic = periodic and plan.gather
        for q in range(i * m, (i + 1) * m):
            want = oracle.axis_window(q, length, kernel, stride, dilation, causal, periodic)
            local = oracle.axis_window(q - first, plan.window, kernel, stride, dilation, causal,
                                       local_periodic)
            got = [(j + first) % length for j in local]
            assert got == want, (plan, i, q)
    return plan


@pytest.mark.parametrize("seed", range(4))
def test_plans_give_every_query_its_global_window(seed):
    rng = np.random.default_rng(seed)
    checked = 0
    while checked < 60:
        shards = int(rng.choice([2, 3, 4, 8]))
        m = int(rng.integers(2, 24))
        length = shards * m
        kernel = int(rng.integers(2, 9))
        dilation = int(rng.integers(1, 5))
        stride = int(rng.integers(1, kernel + 1)) if rng.random() < 0.3 else 1
        periodic = bool(rng.random() < 0.25)
        causal = (not periodic) and bool(rng.random() < 0.25)
        if kernel * dilation > length or (periodic and kernel > length // dilation):
            continue
        _local_windows_ok(length, shards, kernel, stride, dilation, causal, periodic)
        checked += 1


def test_plan_halos_are_the_reach_of_the_windows():
    # K=7 centred windows: 3 rows from each side; the border shards take 6 from one side.
    plan = context.plan_axis(64, 8, 7)
    assert not plan.gather and plan.window == 8 + 6 and plan.starts == (0,) + (3,) * 6 + (6,)
    assert plan.received_rows == 6
    # Causal: only rows before; dilation scales the reach; halos beyond a shard hop further.
    assert context.plan_axis(64, 8, 5, causal=True).starts == (0,) + (4,) * 7
    far = context.plan_axis(128, 8, 7, dilation=4)  # reach 12 rows < 16-row shards: one hop
    assert far.window == 16 + 24 and not far.gather
    # Reach 12 > 8-row shards, and the shifted border windows reach 24 rows inwards: rows come
    # from up to 5 shards away, still less than the axis.
    multi = context.plan_axis(64, 8, 7, dilation=4)
    assert not multi.gather and multi.window == 48 and max(multi.starts) == 40
    # Periodic: the ring unrolled, every shard alike, run locally as an ordinary axis.
    ring = context.plan_axis(32, 4, 3, periodic=True)
    assert ring.starts == (1,) * 4 and ring.window == 10 and not ring.periodic
    # Windows spanning most of the axis: gathered (periodic kept on the gathered axis).
    assert context.plan_axis(32, 4, 7, dilation=3).gather
    gathered = context.plan_axis(30, 3, 3, dilation=4, periodic=True)
    assert gathered.gather and gathered.periodic
    with pytest.raises(ValueError, match="equal shards"):
        context.plan_axis(30, 4, 3)


# ------------------------------------------------------------------ sharded op vs unsharded

_OPS = {1: na1d, 2: na2d, 3: na3d}


def _inputs(rng, shape, heads_kv=None, rpb_kernel=None):
    b, *spatial, h, d = shape
    kv = (b, *spatial, heads_kv or h, d)
    q = jnp.asarray(rng.standard_normal(shape), jnp.float32)
    k, v = (jnp.asarray(rng.standard_normal(kv), jnp.float32) for _ in range(2))
    rpb = None
    if rpb_kernel is not None:
        rpb = jnp.asarray(rng.standard_normal((h, *(2 * k_ - 1 for k_ in rpb_kernel))),
                          jnp.float32)
    return q, k, v, rpb


def _compare(rng, mesh, shape, spatial_axes, backend="xla", heads_kv=None, grads=True, **kw):
    rank = len(shape) - 3
    k_ = kw["kernel_size"]
    kernel = (k_,) * rank if isinstance(k_, int) else tuple(k_)
    q, k, v, rpb = _inputs(rng, shape, heads_kv, kernel if kw.pop("rpb", False) else None)
    op = _OPS[rank]

    def f(q, k, v, rpb, axes):
        return op(q, k, v, rpb=rpb, backend=backend, spatial_axes=axes, **kw)

    want = jax.jit(lambda *a: f(*a, None))(q, k, v, rpb)
    with jax.set_mesh(mesh):
        got = jax.jit(lambda *a: f(*a, spatial_axes))(q, k, v, rpb)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    if not grads:
        return q, k, v, rpb, got
    argnums = (0, 1, 2, 3) if rpb is not None else (0, 1, 2)
    cot = jnp.asarray(rng.standard_normal(want.shape), jnp.float32)

    def loss(axes):
        return lambda *a: jnp.sum(f(*a, axes) * cot)

    g_want = jax.jit(jax.grad(loss(None), argnums))(q, k, v, rpb)
    with jax.set_mesh(mesh):
        g_got = jax.jit(jax.grad(loss(spatial_axes), argnums))(q, k, v, rpb)
    for name, a, b in zip("qkvr", g_got, g_want):
        np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-5, err_msg=f"d{name}")
    return q, k, v, rpb, got


def _mesh(shape, names):
    return jax.make_mesh(shape, names, axis_types=(jax.sharding.AxisType.Auto,) * len(names))


CASES_1D = [  # (length, kernel, stride, dilation, causal, periodic, rpb)
    (64, 7, 1, 1, False, False, True),    # one hop, border shards from one side, RPB
    (64, 7, 1, 4, False, False, False),   # halo of 12 rows > 8-row shards: two hops
    (64, 6, 1, 2, False, False, False),   # even kernel
    (64, 5, 1, 1, True, False, False),    # causal: rows from before only
    (64, 4, 2, 1, False, False, False),   # stride blocks aligned with the shards
    (64, 5, 1, 2, False, True, True),     # periodic ring, RPB on the wrapped offsets
    (48, 7, 1, 5, False, False, False),   # windows span most of the axis: all-gathered
]


@pytest.mark.parametrize("case", CASES_1D, ids=lambda c: "L{}K{}s{}d{}{}{}{}".format(
    c[0], c[1], c[2], c[3], "c" if c[4] else "", "p" if c[5] else "", "r" if c[6] else ""))
def test_1d_sharded_over_8_devices(rng, case):
    length, kernel, stride, dilation, causal, periodic, rpb = case
    _compare(rng, _mesh((8,), ("sp",)), (2, length, 2, 8), ("sp",), kernel_size=kernel,
             stride=stride, dilation=dilation, is_causal=causal, is_periodic=periodic, rpb=rpb)


def test_2d_one_axis_with_batch_sharding_rpb_dilation(rng):
    # DiNAT-like: X split 4 ways, the batch over the other mesh axis, RPB and dilation 2.
    _compare(rng, _mesh((2, 4), ("data", "sp")), (2, 32, 12, 2, 8), ("sp", None),
             kernel_size=5, dilation=(2, 1), rpb=True)


def test_2d_both_axes(rng):
    # X over 4 devices, Y over 2: corners reach the diagonal neighbour through the two steps.
    _compare(rng, _mesh((4, 2), ("x", "y")), (1, 32, 16, 2, 8), ("x", "y"),
             kernel_size=(5, 3), dilation=(1, 2), is_causal=(False, True))


def test_2d_axis_over_two_mesh_axes(rng):
    _compare(rng, _mesh((2, 4), ("a", "b")), (1, 48, 8, 2, 8), (("a", "b"), None),
             kernel_size=(3, 5))


def test_3d_two_axes_grouped_query(rng):
    _compare(rng, _mesh((2, 2, 2), ("t", "x", "h")), (1, 16, 16, 6, 4, 8), ("t", "x", None),
             heads_kv=2, kernel_size=(3, 5, 3), dilation=(2, 1, 1))


def test_backends_inside_the_shards(rng):
    mesh = _mesh((4,), ("sp",))
    for backend in ("reference", "pallas"):
        _compare(rng, mesh, (1, 32, 8, 2, 8), ("sp", None), backend=backend, kernel_size=5,
                 rpb=True)


def test_sharded_forward_matches_float64_oracle(rng):
    q, k, v, rpb, got = _compare(rng, _mesh((8,), ("sp",)), (1, 64, 8, 2, 8), ("sp", None),
                                 grads=False, kernel_size=(7, 3), dilation=(3, 2), rpb=True)
    want, _ = oracle.na_forward(q, k, v, (7, 3), dilation=(3, 2), rpb=rpb)
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_inputs_sharded_with_named_sharding(rng):
    """Eager call on arrays placed with ``NamedSharding(mesh, P(None, "sp", ...))``: the
    spatial split is read from the arrays, and the output keeps it."""
    mesh = _mesh((8,), ("sp",))
    q, k, v, _ = _inputs(rng, (1, 64, 8, 2, 8))
    want = na2d(q, k, v, 5, backend="xla")
    placed = [jax.device_put(x, NamedSharding(mesh, P(None, "sp"))) for x in (q, k, v)]
    got = na2d(*placed, 5, backend="xla")
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)
    assert got.sharding.spec[1] == "sp"


def test_jit_on_a_mesh_with_explicit_axes_reads_the_split(rng):
    """Under ``jax.set_mesh`` with explicit axes (``jax.make_mesh``'s default), a jitted call
    sees its inputs' shardings in their types: no ``spatial_axes`` needed."""
    mesh = jax.make_mesh((4, 2), ("sp", "b"),
                         axis_types=(jax.sharding.AxisType.Explicit,) * 2)
    q, k, v, _ = _inputs(rng, (2, 32, 8, 2, 8))
    want = na2d(q, k, v, 5, dilation=(2, 1), backend="xla")
    with jax.set_mesh(mesh):
        placed = [jax.device_put(x, P("b", "sp")) for x in (q, k, v)]
        f = jax.jit(lambda q, k, v: na2d(q, k, v, 5, dilation=(2, 1), backend="xla"))
        jaxpr = str(jax.make_jaxpr(f)(*placed))
        got = f(*placed)
    assert "ppermute" in jaxpr
    np.testing.assert_allclose(got, want, rtol=1e-5, atol=2e-6)


def test_compiled_program_exchanges_halos_only():
    mesh = _mesh((8,), ("sp",))
    spec = jax.ShapeDtypeStruct((2, 256, 64, 2, 16), jnp.float32)

    def f(q, k, v):
        return neighborhood_attention(q, k, v, 7, backend="xla", spatial_axes=("sp", None))

    with jax.set_mesh(mesh):
        hlo = jax.jit(jax.grad(lambda *a: f(*a).sum(), (0, 1, 2))).lower(
            spec, spec, spec).compile().as_text()
    assert "collective-permute" in hlo
    assert "all-gather" not in hlo
    # Halos only: a permute carries at most the 3 + 3 rows of a K=7 halo per key/value.
    for line in hlo.splitlines():
        if "collective-permute(" in line or "collective-permute-start(" in line:
            shapes = line.split("=")[1].split("collective-permute")[0]
            assert "[2,256," not in shapes and "[2,32,64" not in shapes, line


def test_bad_spatial_axes_name_the_problem(rng):
    q, k, v, _ = _inputs(rng, (1, 30, 8, 2, 8))
    mesh = _mesh((4, 2), ("sp", "b"))
    with pytest.raises(ValueError, match="not divisible"):
        na2d(q, k, v, 3, spatial_axes=("sp", None), mesh=mesh)
    with pytest.raises(ValueError, match="not an axis of the mesh"):
        na2d(q, k, v, 3, spatial_axes=("zz", None), mesh=mesh)
    with pytest.raises(ValueError, match="used twice"):
        na2d(q, k, v, 3, spatial_axes=("b", "b"), mesh=mesh)
    with pytest.raises(ValueError, match="one entry per spatial axis"):
        na2d(q, k, v, 3, spatial_axes=("sp",), mesh=mesh)
    with pytest.raises(ValueError, match="needs a mesh"):
        na2d(q, k, v, 3, spatial_axes=(None, "sp"))


def test_unsharded_entries_run_the_plain_op(rng):
    """Mesh axes of size 1 (or no sharded entry) leave the call as it was."""
    q, k, v, _ = _inputs(rng, (1, 16, 8, 2, 8))
    mesh = _mesh((1, 8), ("sp", "rest"))
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda *a: na2d(*a, 3, spatial_axes=("sp", None)))(q, k, v))
    assert "ppermute" not in jaxpr and "all_gather" not in jaxpr



# ------------------------------------------------------------------ the model switch


@pytest.mark.slow  # default-tier time (~35-60 s); make test-all runs it
def test_train_step_with_context_parallel_stages_equals_single_device(rng):
    """``config.context = 4``: the mesh is (data 2, fsdp 1, context 4); the first stage's
    token rows are split over the context axis (a dilated DiNAT layer with RPB). Two train
    steps equal the single-device steps, the NA halos travel by collective-permute, and the
    only all-gathers hand the downsampled grid's rows to the unsplit second stage."""
    from nat_jax.train import sharding

    from test_sharded_kernels import _two_steps
    from test_train import fixed_batch, no_aug, tiny_config

    c = no_aug(tiny_config("dinat_mini", fsdp_min_size=0, learning_rate=5e-3, image_size=64))
    c.model_overrides.drop_path_rate = 0.0
    batch = fixed_batch(rng, size=64)

    p1, l1, _ = _two_steps(c, sharding.make_mesh(fsdp=1, devices=jax.devices()[:1]), batch)
    c.context = 4
    mesh = sharding.make_mesh(fsdp=1, context=4)
    assert dict(mesh.shape) == {"data": 2, "fsdp": 1, "context": 4}
    p4, l4, hlo = _two_steps(c, mesh, batch, hlo=True)
    np.testing.assert_allclose(l4, l1, rtol=1e-5)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=5e-5), p4, p1)
    assert "collective-permute" in hlo
    for line in hlo.splitlines():
        if "all-gather(" in line or "all-gather-start(" in line:
            # stage 2's grid: 8 images of the data shard, 8x8 tokens, 32 channels
            assert line.split("=", 1)[1].strip().startswith("f32[8,8,8,32]"), line


def test_model_with_context_axis_runs_unsplit_without_a_mesh(rng):
    from flax import nnx

    from nat_jax import configs, zoo

    cfg = configs.get("dinat_mini", embed_dim=16, depths=(1, 1), num_heads=(1, 2),
                      dilations=((2,), (1,)), kernel_size=3, num_labels=10)
    x = jnp.asarray(rng.standard_normal((2, 64, 64, 3)), jnp.float32)
    plain = zoo.build_model(cfg, rngs=nnx.Rngs(0))
    split = zoo.build_model(cfg, rngs=nnx.Rngs(0), context_axis="context")
    np.testing.assert_allclose(split(x).logits, plain(x).logits, rtol=1e-6, atol=1e-6)
    mesh = _mesh((2, 4), ("data", "context"))
    with jax.set_mesh(mesh):
        jaxpr = str(jax.make_jaxpr(lambda x: split(x).logits)(x))
        got = jax.jit(lambda x: split(x).logits)(x)
    assert "ppermute" in jaxpr
    np.testing.assert_allclose(got, plain(x).logits, rtol=1e-5, atol=1e-5)


def test_context_mesh_validation():
    from nat_jax.train import sharding
    from nat_jax.train.errors import UserInputError

    with pytest.raises(UserInputError, match="context=3"):
        sharding.make_mesh(context=3)
    with pytest.raises(UserInputError, match="fsdp=4"):
        sharding.make_mesh(fsdp=4, context=4)
    assert dict(sharding.make_mesh(fsdp=-1, context=2).shape) == {"data": 1, "fsdp": 4,
                                                                   "context": 2}
