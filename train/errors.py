"""The error type for bad user input to training (configs, overrides, data, workdir, launch).

``nat-jax train`` prints these as one line, without a traceback; everything else keeps its
traceback (a bug should be debuggable). It subclasses ValueError, so ``except ValueError`` in
user code still catches it.
"""

from __future__ import annotations


class UserInputError(ValueError):
    """A config value, override, data location, workdir or launch setting that cannot work."""
