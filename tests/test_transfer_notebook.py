"""notebooks/transfer_axes.ipynb executes: it redraws every committed transfer figure and, in
small mode (``RERUN``), trains and draws a small axis itself."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the 'notebooks' extra (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="needs the 'notebooks' extra (nbclient)")
pytest.importorskip("ipykernel", reason="needs the 'notebooks' extra (ipykernel)")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "transfer_axes.ipynb"
RESULTS = ROOT / "experiments" / "results"
AXES = ("depth", "steps", "batch", "width", "hps")


def test_transfer_notebook_redraws_the_committed_figures_and_reruns_small(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    # As papermill does: a cell after the one tagged "parameters" overrides them.
    nb.cells.insert(tagged[0] + 1, nbformat.v4.new_code_cell(
        f"RERUN = True\nRERUN_AXES = ['depth']\nRERUN_RULES = ['umup']\n"
        f"OUT_DIR = pathlib.Path({str(tmp_path)!r})"))
    # Started where Jupyter starts it (notebooks/ of this clone), so it uses this clone.
    nbclient.NotebookClient(nb, timeout=600, kernel_name="python3",
                            resources={"metadata": {"path": str(NOTEBOOK.parent)}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]
    text = "".join(o.get("text", "") for o in outputs)
    assert f"from {ROOT / 'umup_jax'}\n" in text
    committed = [a for a in AXES if (RESULTS / f"transfer_{a}" / "results.csv").exists()]
    for axis in committed:
        assert f"{axis}: " in text and (tmp_path / f"transfer_{axis}_notebook.png").stat(
        ).st_size > 10_000
    assert "transfer error" in text
    # The small rerun: its results, and its figure redrawn by the notebook.
    assert (tmp_path / "transfer_depth_small" / "results.csv").exists()
    assert (tmp_path / "transfer_depth_small.png").stat().st_size > 10_000
    assert sum("image/png" in o.get("data", {}) for o in outputs) >= len(committed) + 1
