"""The Colab notebook executes (its default mode: plots the committed width-transfer results)."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the 'notebooks' extra (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="needs the 'notebooks' extra (nbclient)")
pytest.importorskip("ipykernel", reason="needs the 'notebooks' extra (ipykernel)")

ROOT = pathlib.Path(__file__).resolve().parent.parent


def test_width_transfer_notebook_executes(tmp_path):
    nb = nbformat.read(ROOT / "notebooks" / "width_transfer.ipynb", as_version=4)
    client = nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute()
    outputs = "".join(o.get("text", "") for c in nb.cells if c.cell_type == "code"
                      for o in c.get("outputs", []))
    assert "runs from" in outputs and "transfer error" in outputs
    assert any("image/png" in o.get("data", {}) for c in nb.cells if c.cell_type == "code"
               for o in c.get("outputs", []))
    assert (tmp_path / "width_transfer_notebook.png").stat().st_size > 10_000
