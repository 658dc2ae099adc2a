"""Host memory settings that make XLA:CPU (and PyTorch on CPU) faster: transparent huge pages
for malloc.

XLA:CPU allocates each execution's buffers with glibc's ``malloc``. glibc serves large blocks
with fresh ``mmap`` pages and unmaps them on ``free``, so every execution touches its
temporaries' pages anew: NAT-Mini's train step (batch 16, fp32, 2-core VM) took 757k minor page
faults and 1.2 s of system time per step. With the glibc tunable ``glibc.malloc.hugetlb=1``
(glibc >= 2.35), malloc asks the kernel for transparent huge pages (``madvise``), and the same
step took 2.7k faults and 0.55 s of system time: 3.44 -> ~3.10 s. Elementwise passes over
fresh outputs run 2.5x faster (a 38 MB ``x * 2 + 1``: 8.6 -> 3.3 ms).

The tunable is read when a process starts, so it has to be in the environment beforehand:

* the ``nat-jax`` command line and the benchmarks restart themselves once with it
  (:func:`relaunch_with_huge_pages`); ``NAT_JAX_HUGE_PAGES=0`` turns that off;
* for a notebook, start the kernel's process with it, e.g.
  ``GLIBC_TUNABLES=glibc.malloc.hugetlb=1 jupyter lab``; ``make test`` sets it for pytest.

It changes nothing on hosts without glibc or with transparent huge pages off (``never``).
"""

from __future__ import annotations

import os
import platform
import sys

TUNABLE = "glibc.malloc.hugetlb"
SETTING = f"{TUNABLE}=1"
OPT_OUT = "NAT_JAX_HUGE_PAGES"
_THP = "/sys/kernel/mm/transparent_hugepage/enabled"


def transparent_huge_pages() -> str | None:
    """The kernel's transparent-huge-page mode (``always``, ``madvise`` or ``never``), or None
    where the kernel does not say (not Linux, or no THP support)."""
    try:
        with open(_THP) as f:
            text = f.read()
    except OSError:
        return None
    chosen = [w[1:-1] for w in text.split() if w.startswith("[") and w.endswith("]")]
    return chosen[0] if chosen else None


def _tunable(environ) -> str | None:
    """The value ``GLIBC_TUNABLES`` in ``environ`` gives ``glibc.malloc.hugetlb``, or None."""
    for item in environ.get("GLIBC_TUNABLES", "").split(":"):
        name, _, value = item.partition("=")
        if name.strip() == TUNABLE:
            return value.strip()
    return None


def huge_pages_enabled(environ: dict[str, str] | None = None) -> bool:
    """Whether this process was started with malloc's huge pages on (``GLIBC_TUNABLES`` sets
    ``glibc.malloc.hugetlb`` to a non-zero value)."""
    return _tunable(os.environ if environ is None else environ) not in (None, "", "0")


def relaunch_reason(environ: dict[str, str] | None = None, *, thp: str | None = "probe",
                    libc: str | None = None) -> str | None:
    """Why :func:`relaunch_with_huge_pages` would restart this process, or None when it would
    not: not Linux with glibc, transparent huge pages off or unknown, the tunable already set
    (either way), or ``NAT_JAX_HUGE_PAGES=0``."""
    environ = os.environ if environ is None else environ
    thp = transparent_huge_pages() if thp == "probe" else thp
    libc = platform.libc_ver()[0] if libc is None else libc
    if environ.get(OPT_OUT, "1").strip() == "0" or libc != "glibc" or thp not in ("always",
                                                                                    "madvise"):
        return None
    if _tunable(environ) is not None:
        return None
    return f"malloc without huge pages (transparent huge pages: {thp})"


def relaunch_with_huge_pages() -> None:
    """Restart this process (same interpreter, flags and arguments; ``os.execve``) with
    ``glibc.malloc.hugetlb=1`` added to ``GLIBC_TUNABLES`` when :func:`relaunch_reason` says so;
    otherwise return. Call it first thing in a command's ``main``, before any work: output
    written so far is flushed, everything else of the old process is gone. Does nothing in an
    interactive interpreter (there is no command to run again)."""
    argv = list(getattr(sys, "orig_argv", ()))
    if len(argv) < 2 or sys.flags.interactive or relaunch_reason() is None:
        return
    env = dict(os.environ)
    env["GLIBC_TUNABLES"] = ":".join(t for t in (env.get("GLIBC_TUNABLES", ""), SETTING) if t)
    sys.stdout.flush()
    sys.stderr.flush()
    os.execve(sys.executable, [sys.executable, *argv[1:]], env)
