"""Execute examples/inference.ipynb end to end so it never rots."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

import ipykernel  # noqa: E402,F401  (test extra: a missing one must fail, not skip)
import nbclient  # noqa: E402
import nbformat  # noqa: E402

NOTEBOOK = Path(__file__).resolve().parents[1] / "examples" / "inference.ipynb"
KERNEL = "nat-jax-test"


@pytest.fixture
def kernel_name(tmp_path, monkeypatch):
    """A kernelspec for *this* interpreter (the venv), found first through JUPYTER_PATH."""
    from ipykernel.kernelspec import write_kernel_spec
    write_kernel_spec(tmp_path / "kernels" / KERNEL)
    monkeypatch.setenv("JUPYTER_PATH", str(tmp_path))
    from jupyter_client.kernelspec import KernelSpecManager
    spec = KernelSpecManager().get_kernel_spec(KERNEL)
    assert spec.argv[0] == sys.executable
    return KERNEL


def test_inference_notebook_runs(kernel_name):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    client = nbclient.NotebookClient(nb, kernel_name=kernel_name, timeout=600,
                                     resources={"metadata": {"path": str(NOTEBOOK.parent)}})
    client.execute()
    outputs = [o for cell in nb.cells if cell.cell_type == "code" for o in cell.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    text = "".join(o.get("text", "") for o in outputs if o.output_type == "stream")
    assert "DinatForImageClassification" in text
    assert text.count("%  ") == 5  # five top-5 lines with label names
    assert "attention mass on the window: 1.000" in text
    assert any("image/png" in o.get("data", {}) for o in outputs)  # the attention plot
