"""Every notebook runs headless top to bottom on tiny sizes and saves the plots it promises."""

import time
from pathlib import Path

import nbformat
import pytest

nbclient = pytest.importorskip("nbclient")

NOTEBOOKS = Path(__file__).resolve().parents[1] / "notebooks"
COMMON = {"NUM_USERS": 150, "NUM_ITEMS": 200, "NUM_CLUSTERS": 8, "MEAN_SEQUENCE_LENGTH": 12, "MAX_SEQ_LEN": 12}
CASES = {
    "01_data": ({}, ["sequence_lengths.png", "item_popularity.png"]),
    "02_mol_vs_dot": (
        {"ITEM_DIM": 16, "EPOCHS": 2, "MOL_COMPONENTS": (2, 2, 16)},
        ["hr_at_k.png", "gate_usage.png", "score_distributions.png", "item_tsne.png"],
    ),
    "03_retrieval": (
        {"ITEM_DIM": 16, "EPOCHS": 1, "MOL_COMPONENTS": (2, 2, 16), "CORPUS_SIZE": 1500, "NUM_QUERIES": 32, "K": 50,
         "K_PRIMES": [4, 16], "REPEATS": 1, "SHOW_USERS": 2},
        ["recall_vs_latency.png"],
    ),
}


@pytest.mark.slow
@pytest.mark.parametrize("name", sorted(CASES))
def test_notebook_runs_headless(name, tmp_path, monkeypatch):
    overrides, pngs = CASES[name]
    monkeypatch.setenv("WANDB_MODE", "disabled")
    nb = nbformat.read(NOTEBOOKS / f"{name}.ipynb", as_version=4)
    first = nb.cells[1]
    assert "parameters" in first.metadata.get("tags", []), "the first code cell is the parameters cell"
    assert not any(cell.get("outputs") for cell in nb.cells if cell.cell_type == "code"), "notebooks are stored without outputs"
    # As papermill does: a cell right after the parameters cell overrides them.
    values = {**COMMON, **overrides, "OUT_DIR": str(tmp_path / "out")}
    nb.cells.insert(2, nbformat.v4.new_code_cell("\n".join(f"{k} = {v!r}" for k, v in values.items())))
    started = time.perf_counter()
    nbclient.NotebookClient(nb, timeout=240, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}).execute()
    seconds = time.perf_counter() - started
    errors = [o for cell in nb.cells for o in cell.get("outputs", []) if o.get("output_type") == "error"]
    assert not errors
    for png in pngs:
        path = tmp_path / "out" / png
        assert path.is_file() and path.stat().st_size > 5000, f"{png} missing or empty"
    assert seconds < 240, f"{name} took {seconds:.0f} s"
