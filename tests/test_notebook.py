"""The example notebook (docs/notebook.ipynb) runs top to bottom (nbclient) on the tiny run, and
its cells render what they promise: the viewer inline, a table of concepts, a label written."""

from __future__ import annotations

import shutil
from pathlib import Path

import pytest

NOTEBOOK = Path(__file__).resolve().parents[1] / "docs" / "notebook.ipynb"


def test_notebook_runs_top_to_bottom(tiny_run, tmp_path, monkeypatch) -> None:
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    pytest.importorskip("ipykernel")
    run = tmp_path / "run"
    shutil.copytree(tiny_run["run"], run)  # the notebook writes labels.yaml into the run
    monkeypatch.setenv("GIG_RUN", str(run))
    monkeypatch.setenv("OMP_NUM_THREADS", "1")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(
        nb, timeout=600, kernel_name="python3", resources={"metadata": {"path": str(tmp_path)}}
    ).execute()
    outputs = {i: c.get("outputs", []) for i, c in enumerate(nb.cells) if c.cell_type == "code"}
    errors = [o for out in outputs.values() for o in out if o.get("output_type") == "error"]
    assert errors == []
    html = [o["data"]["text/html"] for out in outputs.values() for o in out if "text/html" in o.get("data", {})]
    assert any("<iframe srcdoc=" in h and "gig-data" in h for h in html), "the viewer is shown inline"
    assert any("member classes" in h for h in html), "the concept table is shown"
    assert any("p ablated" in h for h in html), "the ablation table is shown"
    assert any("image/png" in o.get("data", {}) for out in outputs.values() for o in out), "a matplotlib figure"
    assert "my concept" in (run / "labels.yaml").read_text()
