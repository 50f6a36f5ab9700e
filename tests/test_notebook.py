"""The Colab notebook executes (its default mode: plots the committed width-transfer results)
from the clone it sits in, started where Jupyter starts it (``notebooks/``); outside a clone,
without its git URL, the setup cell of every notebook stops with one line."""

import pathlib

import pytest

nbformat = pytest.importorskip("nbformat", reason="needs the 'notebooks' extra (nbformat)")
nbclient = pytest.importorskip("nbclient", reason="needs the 'notebooks' extra (nbclient)")
pytest.importorskip("ipykernel", reason="needs the 'notebooks' extra (ipykernel)")

ROOT = pathlib.Path(__file__).resolve().parent.parent
NOTEBOOK = ROOT / "notebooks" / "width_transfer.ipynb"
NOTEBOOKS = sorted((ROOT / "notebooks").glob("*.ipynb"))


def execute(nb, cwd: pathlib.Path) -> None:
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3",
                            resources={"metadata": {"path": str(cwd)}}).execute()


def outputs_of(nb) -> list:
    return [o for c in nb.cells if c.cell_type == "code" for o in c.get("outputs", [])]


def test_width_transfer_notebook_executes_from_its_clone(tmp_path):
    nb = nbformat.read(NOTEBOOK, as_version=4)
    # As papermill does: a cell after the one tagged "parameters" sets where output goes.
    tagged = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(tagged) == 1
    nb.cells.insert(tagged[0] + 1,
                    nbformat.v4.new_code_cell(f"OUT_DIR = pathlib.Path({str(tmp_path)!r})"))
    execute(nb, ROOT / "notebooks")
    text = "".join(o.get("text", "") for o in outputs_of(nb))
    assert f"from {ROOT / 'umup_jax'}\n" in text  # the clone's own package
    assert "runs from" in text and "transfer error" in text
    assert any("image/png" in o.get("data", {}) for o in outputs_of(nb))
    assert (tmp_path / "width_transfer_notebook.png").stat().st_size > 10_000


@pytest.mark.parametrize("notebook", NOTEBOOKS, ids=lambda p: p.stem)
def test_outside_a_clone_without_a_git_url_the_setup_cell_says_so_in_one_line(notebook,
                                                                             tmp_path):
    nb = nbformat.read(notebook, as_version=4)
    first_code = next(i for i, c in enumerate(nb.cells) if c.cell_type == "code")
    assert 'UMUP_JAX_GIT_URL = ""' in nb.cells[first_code].source.splitlines()[1]
    nb.cells = nb.cells[: first_code + 1]
    with pytest.raises(nbclient.exceptions.CellExecutionError):
        execute(nb, tmp_path)
    errors = [o for o in outputs_of(nb) if o.output_type == "error"]
    assert [e.traceback for e in errors] == [[
        "SetupError: not inside a clone of umup-jax: set UMUP_JAX_GIT_URL at the top of this "
        "cell to its git URL"]]
    assert not list(tmp_path.iterdir())  # nothing cloned or written
