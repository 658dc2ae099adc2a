"""nat_jax.host: when the command line and the benchmarks restart with malloc's huge pages, and
that the restart keeps the command and adds the tunable once."""

from __future__ import annotations

import os
import subprocess
import sys

import pytest

from nat_jax import host


def test_tunable_parsing():
    assert host.huge_pages_enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"})
    assert host.huge_pages_enabled(
        {"GLIBC_TUNABLES": "glibc.malloc.check=0:glibc.malloc.hugetlb=2"})
    assert not host.huge_pages_enabled({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"})
    assert not host.huge_pages_enabled({"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert not host.huge_pages_enabled({})


@pytest.mark.parametrize("environ,thp,libc,relaunch", [
    ({}, "madvise", "glibc", True),
    ({}, "always", "glibc", True),
    ({"GLIBC_TUNABLES": "glibc.malloc.check=0"}, "madvise", "glibc", True),
    ({}, "never", "glibc", False),          # malloc's madvise would be ignored
    ({}, None, "glibc", False),             # no THP (or not Linux)
    ({}, "madvise", "", False),             # musl, macOS: not glibc's tunable
    ({"NAT_JAX_HUGE_PAGES": "0"}, "madvise", "glibc", False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=1"}, "madvise", "glibc", False),
    ({"GLIBC_TUNABLES": "glibc.malloc.hugetlb=0"}, "madvise", "glibc", False),  # the user's call
])
def test_relaunch_reason(environ, thp, libc, relaunch):
    assert (host.relaunch_reason(environ, thp=thp, libc=libc) is not None) == relaunch


_SCRIPT = ("import os, sys; from nat_jax import host; print('start', flush=True); "
           "host.relaunch_with_huge_pages(); "
           "print(os.environ.get('GLIBC_TUNABLES'), sys.argv[1:], flush=True)")


def _run(env_extra: dict[str, str]) -> list[str]:
    env = {k: v for k, v in os.environ.items() if k not in ("GLIBC_TUNABLES", host.OPT_OUT)}
    env.update(env_extra)
    done = subprocess.run([sys.executable, "-c", _SCRIPT, "a b", "--flag"], env=env,
                          capture_output=True, text=True, timeout=120)
    assert done.returncode == 0, done.stderr
    return done.stdout.splitlines()


@pytest.mark.skipif(host.relaunch_reason({}) is None,
                    reason="this host would not relaunch (no glibc or no transparent huge pages)")
def test_relaunch_restarts_once_with_the_same_arguments():
    lines = _run({})
    # The first process printed "start" and was replaced; the second starts again and stays.
    assert lines == ["start", "start", "glibc.malloc.hugetlb=1 ['a b', '--flag']"]
    lines = _run({"GLIBC_TUNABLES": "glibc.malloc.check=0"})
    assert lines[-1] == "glibc.malloc.check=0:glibc.malloc.hugetlb=1 ['a b', '--flag']"
    assert _run({host.OPT_OUT: "0"}) == ["start", "None ['a b', '--flag']"]
