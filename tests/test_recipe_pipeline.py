"""Tests for launch/pipeline.py: the stage list, the runner's skip / resume / failure handling, and
the whole tiny pipeline end to end in a subprocess (every stage, the report, --json, a rerun that
skips everything), and notebooks/quickstart.ipynb executed top to bottom on that run.

The tests that read conftest's session-wide tiny pipeline run live in this one file, so that
pytest-xdist (`--dist loadfile`, see pyproject.toml) runs them on one worker and the run is
made once."""

import io
import json
import os
import subprocess
import sys

import nbclient
import nbformat
import pytest

from dalle3_jax import configlib
from dalle3_jax.recipe import runner as runner_lib
from dalle3_jax.recipe import stages as stages_lib

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NOTEBOOK = os.path.join(ROOT, "notebooks", "quickstart.ipynb")
CACHE = os.environ.get("DALLE3_JAX_TEST_CACHE",
                       os.path.join(os.path.expanduser("~"), ".cache", "dalle3_jax", "jax_test_cache"))


def _pipeline_config(variant):
    return configlib.load_config_file(os.path.join(ROOT, "configs", f"pipeline.py:{variant}"))


@pytest.mark.parametrize("variant", ["tiny", "quick", "full"])
def test_every_stage_command_names_real_configs_and_keys(variant, tmp_path):
    config = _pipeline_config(variant)
    stages = stages_lib.build(config, str(tmp_path))
    names = [s.name for s in stages]
    assert len(names) == len(set(names))
    assert names[:4] == ["pretrain", "ssc", "dsc", "recaption"]
    runs = list(config.t2i.runs)
    assert {"alt", "ssc95", "dsc95"} <= set(runs)
    assert all(f"t2i_{r}" in names for r in runs) and names[-1] == "evaluate"
    if variant == "full":
        assert {"dsc65", "dsc80", "dsc90"} <= set(runs) and not config.world.single_object
    for stage in stages:
        assert os.path.exists(stage.argv[1]), stage.argv[1]
        spec = next((a.split("=", 1)[1] for a in stage.argv if a.startswith("--config=")), None)
        if spec is None:
            continue
        # The variant string parses and every --config.x=y override names an existing key: the
        # same checks launch/train.py makes before it starts (a typo here would fail minutes in).
        configlib.load_config_file(os.path.join(ROOT, spec))
        configlib.check_overrides([a.replace(f"--config={spec}", f"--config={os.path.join(ROOT, spec)}")
                                   for a in stage.argv])


def test_bad_variant_is_a_clear_error():
    with pytest.raises(ValueError, match="unknown config variant key 'fast'"):
        _pipeline_config("fast")


def _stage(name, code, tmp_path):
    return stages_lib.Stage(name, f"run {name}", [sys.executable, "-c", code], str(tmp_path / name), "test")


def test_runner_skips_done_stages_and_reruns_changed_ones(tmp_path):
    out = io.StringIO()
    runner = runner_lib.Runner(str(tmp_path), out=out)
    counter = tmp_path / "count.txt"
    code = f"open({str(counter)!r}, 'a').write('x'); print('step 1/1 done')"
    stage = _stage("a", code, tmp_path)
    first = runner.run([stage], 1, stage)
    assert not first["skipped"] and counter.read_text() == "x"
    assert "a | step 1/1 done" in out.getvalue()
    again = runner_lib.Runner(str(tmp_path), out=out).run([stage], 1, stage)
    assert again["skipped"] and counter.read_text() == "x"
    changed = _stage("a", code + "; print('more')", tmp_path)
    assert not runner.run([changed], 1, changed)["skipped"] and counter.read_text() == "xx"
    log = (tmp_path / "logs" / "a.log").read_text()
    assert log.splitlines().count("step 1/1 done") == 2  # the log keeps both runs' output


def test_runner_failure_names_the_stage_and_leaves_it_undone(tmp_path):
    runner = runner_lib.Runner(str(tmp_path), out=io.StringIO())
    stage = _stage("boom", "import sys; print('bad input: x'); sys.exit(3)", tmp_path)
    with pytest.raises(runner_lib.StageFailed, match=r"(?s)stage boom failed \(exit status 3\).*bad input: x"):
        runner.run([stage], 1, stage)
    assert runner.record(stage) is None


@pytest.fixture(scope="module")
def tiny_pipeline(tiny_pipeline_run):
    # The first run is conftest's (shared with the notebook test); this is a rerun of the same command.
    workdir, first_stdout = tiny_pipeline_run
    env = dict(os.environ)
    # Children compile the same tiny programs as the tests: share the tests' compilation cache.
    env["DALLE3_JAX_CACHE"] = os.environ.get(
        "DALLE3_JAX_TEST_CACHE", os.path.join(os.path.expanduser("~"), ".cache", "dalle3_jax", "jax_test_cache"))
    env["XLA_FLAGS"] = "--xla_backend_optimization_level=0"  # one device, as in the first run
    cmd = [sys.executable, os.path.join(ROOT, "launch", "pipeline.py"), "--config=configs/pipeline.py:tiny",
           f"--workdir={workdir}", "--json", "--quiet"]
    second = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
    assert second.returncode == 0, second.stdout[-4000:] + second.stderr[-4000:]
    return workdir, first_stdout, second.stdout


def test_tiny_pipeline_runs_every_stage_and_prints_headline(tiny_pipeline):
    workdir, stdout, _ = tiny_pipeline
    head = json.loads(stdout.strip().splitlines()[-1])
    for name in ("alt", "ssc95", "dsc95"):
        for key in ("clip_score_gt", "clip_score_descriptive", "mean_fact_accuracy", "all_facts_correct"):
            assert isinstance(head[name][key], float), (name, key)
        assert 0.0 <= head[name]["mean_fact_accuracy"] <= 1.0
    config = _pipeline_config("tiny")
    for stage in stages_lib.build(config, str(workdir)):
        assert head["stage_wall_s"][stage.name] > 0
    assert head["stages_skipped"] == []
    report = (workdir / "report.md").read_text()
    for section in ("## Does training on descriptive", "## Samples", "## Caption quality", "## Caption examples",
                    "## Stages"):
        assert section in report
    for png in ("clip_score.png", "prompt_following.png", "samples.png"):
        assert (workdir / "report" / png).stat().st_size > 1000


def test_tiny_pipeline_rerun_skips_every_stage(tiny_pipeline):
    workdir, _, stdout = tiny_pipeline
    head = json.loads(stdout.strip().splitlines()[-1])
    config = _pipeline_config("tiny")
    assert sorted(head["stages_skipped"]) == sorted(s.name for s in stages_lib.build(config, str(workdir)))


@pytest.mark.timeout(600)
def test_quickstart_notebook_runs_on_cpu(tiny_pipeline_run, tmp_path):
    """The notebook at the tiny size on the shared tiny run: its pipeline cell reruns the same
    command (every stage finished, so each is skipped and the report is rewritten), then it shows
    the headline, the report plots and the sample grids, and samples a new prompt."""
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
