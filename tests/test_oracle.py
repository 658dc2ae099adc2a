"""The float64 oracle itself: worked examples from the rules and finite-difference gradients."""

import pytest

import oracle
from nat_jax.kernels import windows


def test_worked_examples_from_the_rules():
    assert [oracle.axis_window(i, 7, 3, 1, 1, False) for i in range(7)] == [
        [0, 1, 2], [0, 1, 2], [1, 2, 3], [2, 3, 4], [3, 4, 5], [4, 5, 6], [4, 5, 6]]
    assert oracle.axis_window(0, 10, 3, 1, 2, False) == [0, 2, 4]
    assert oracle.axis_window(1, 10, 3, 1, 2, False) == [1, 3, 5]
    assert oracle.axis_window(8, 10, 3, 1, 2, False) == [4, 6, 8]
    assert [oracle.axis_window(i, 6, 3, 1, 1, True) for i in range(4)] == [
        [0], [0, 1], [0, 1, 2], [1, 2, 3]]
    # Even kernel: K/2 keys before the query, K/2 - 1 after.
    assert oracle.axis_window(5, 10, 4, 1, 1, False) == [3, 4, 5, 6]


def test_shared_window_tables_agree_with_oracle(rng):
    """kernels.windows (used by every backend) against the oracle's independent rules."""
    for _ in range(300):
        length = int(rng.integers(2, 40))
        kernel = int(rng.integers(2, length + 1))
        dilation = int(rng.integers(1, length // kernel + 1))
        stride = int(rng.integers(1, kernel + 1))
        causal = bool(rng.integers(2))
        idx, valid = windows.neighbor_indices(length, kernel, stride, dilation, causal)
        for i in range(length):
            want = oracle.axis_window(i, length, kernel, stride, dilation, causal)
            assert list(idx[i][valid[i]]) == want, (length, kernel, stride, dilation, causal, i)


@pytest.mark.parametrize("case", [
    dict(shape=(9,), kernel=3, stride=1, dilation=2, causal=False, rpb=True),
    dict(shape=(5, 6), kernel=(3, 2), stride=(2, 1), dilation=1, causal=(True, False), rpb=False),
    dict(shape=(5, 5), kernel=3, stride=1, dilation=1, causal=False, rpb=True),
])
def test_oracle_gradients_match_finite_differences(rng, case):
    shape, h, d = case["shape"], 2, 3
    q, k, v, do = (rng.standard_normal((1, *shape, h, d)) for _ in range(4))
    kern = case["kernel"] if isinstance(case["kernel"], tuple) else (case["kernel"],) * len(shape)
    rpb = rng.standard_normal((h, *(2 * x - 1 for x in kern))) if case["rpb"] else None
    args = dict(kernel=case["kernel"], stride=case["stride"], dilation=case["dilation"],
                causal=case["causal"])

    def loss(q, k, v, rpb):
        return float((oracle.na_forward(q, k, v, rpb=rpb, **args)[0] * do).sum())

    grads = oracle.na_backward(q, k, v, do, rpb=rpb, **args)
    eps = 1e-6
    for which, (x, g) in enumerate(zip((q, k, v, rpb), grads)):
        if x is None:
            continue
        for _ in range(6):
            pos = tuple(int(rng.integers(n)) for n in x.shape)
            xp, xm = x.copy(), x.copy()
            xp[pos] += eps
            xm[pos] -= eps
            ins_p = [q, k, v, rpb]
            ins_m = [q, k, v, rpb]
            ins_p[which], ins_m[which] = xp, xm
            fd = (loss(*ins_p) - loss(*ins_m)) / (2 * eps)
            assert abs(fd - g[pos]) < 1e-6 * max(1.0, abs(fd)), (which, pos, fd, g[pos])
