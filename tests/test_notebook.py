"""notebooks/quickstart.ipynb executed top to bottom on CPU (nbclient), at the tiny size, on the
tiny pipeline run the pipeline tests share: its pipeline cell reruns the same command (every
stage finished, so each is skipped and the report is rewritten), then it shows the headline,
the report plots and the sample grids, and samples a new prompt with launch/sample.py."""

import os

import nbclient
import nbformat
import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
CACHE = os.environ.get("DALLE3_JAX_TEST_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "dalle3_jax", "jax_test_cache"))


@pytest.mark.timeout(600)
def test_quickstart_notebook_runs_on_cpu(tiny_pipeline_run, tmp_path):
    workdir, _ = tiny_pipeline_run
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbformat.validate(nb)
    assert nb.metadata["accelerator"] == "TPU"
    params = [i for i, c in enumerate(nb.cells) if "parameters" in c.metadata.get("tags", [])]
    assert len(params) == 1 and 'REPO_URL = ""' in nb.cells[params[0]].source
    # As papermill would: the test's values in a cell after the notebook's settings.
    overrides = (f"REPO_DIR = {ROOT!r}\nINSTALL = False\nVARIANT = 'tiny'\nWORKDIR = {str(workdir)!r}\n"
                 "PROMPT = 'a large green square in the center'")
    nb.cells.insert(params[0] + 1, nbformat.v4.new_code_cell(overrides))
    env = dict(os.environ, DALLE3_JAX_CACHE=CACHE, JAX_PLATFORMS="cpu")
    client = nbclient.NotebookClient(nb, timeout=500, kernel_name="python3",
                                     resources={"metadata": {"path": str(tmp_path)}})
    client.execute(env=env)

    def outputs(kind):
        return [o for c in nb.cells if c.cell_type == "code" for o in c.outputs if o.output_type == kind]

    text = "".join(o.text for o in outputs("stream"))
    assert "pipeline finished" in text and "8 devices" in text
    images = [o for o in outputs("display_data") if "image/png" in o.data]
    # Two report plots, the side-by-side grid, three runs' own grids, the new prompt's grid.
    assert len(images) == 7, len(images)
    tables = [o.data["text/markdown"] for o in outputs("display_data") if "text/markdown" in o.data]
    assert tables and all(f"| {run} |" in tables[0] for run in ("alt", "ssc95", "dsc95"))
    assert os.path.getsize(os.path.join(workdir, "my_prompt.png")) > 100
    with open(os.path.join(workdir, "my_prompt.txt")) as f:
        assert f.read().strip() == "a large green square in the center"
