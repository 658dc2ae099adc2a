"""Running a command that obeys file permission bits, also when the tests run as root.

Root bypasses permission bits (CAP_DAC_OVERRIDE / CAP_DAC_READ_SEARCH), so a test of "SRC is
unreadable" or "the workdir is not writable" that just chmods a file would pass or fail
depending on who runs it. :func:`permission_bound` runs the command without those two
capabilities (``setpriv`` from util-linux) when the tests run as root, and as it is otherwise:
either way the kernel refuses the access for real.
"""

from __future__ import annotations

import os
import subprocess
import sys


def permission_bound(argv: list[str]) -> list[str]:
    """``argv`` so that it obeys file permission bits (see the module docstring)."""
    if os.geteuid() != 0:
        return list(argv)
    return ["setpriv", "--bounding-set=-dac_override,-dac_read_search", "--", *argv]


def nat_jax_cli(*args) -> subprocess.CompletedProcess:
    """``nat-jax ARGS`` (this environment's console script) bound by permission bits; 120 s."""
    script = os.path.join(os.path.dirname(sys.executable), "nat-jax")
    return subprocess.run(permission_bound([script, *map(str, args)]), capture_output=True,
                          text=True, timeout=120,
                          env={**os.environ, "JAX_PLATFORMS": "cpu"})
