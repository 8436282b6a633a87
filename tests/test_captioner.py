"""The captioner stage end to end on tiny configs: pretrain -> fine-tune -> evaluate, and the
same losses on 1 device and on 8-device meshes."""

import os

import numpy as np
import pytest

from dalle3_jax import configlib, metrics, trainers
from dalle3_jax.evals import captions as caption_evals
from dalle3_jax.trainers import loop

import strategy_helpers as strategies

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")


def _config(name, variant="tiny"):
    return configlib.load_config_file(os.path.join(CONFIGS, f"{name}.py:{variant}"))


def _train(config, workdir, evaluate=True):
    task = trainers.build_task(config, workdir)
    if not evaluate:
        task.evaluate = None  # the loss alone: no eval programs to compile
    return loop.train_and_evaluate(config, workdir, task)


@pytest.fixture(scope="module")
def pretrained(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("pretrain"))
    config = _config("captioner_pretrain")
    result = _train(config, workdir)
    return workdir, result


def test_pretrain_reports_every_eval(pretrained):
    workdir, result = pretrained
    assert result["step"] == 4
    for key in ("val_loss", "retrieval_i2t_r1", "retrieval_t2i_r1", "fact_precision", "fact_recall",
                "main_subject_accuracy", "fact_recall/shape", "fact_recall/place", "fact_recall/background"):
        assert np.isfinite(result[key]), key
    assert os.path.exists(os.path.join(workdir, "config.json"))
    texts = metrics.read_jsonl(workdir, kind="texts")
    assert texts and "| id | generated | reference |" in texts[-1]["values"]["eval/captions"]


def test_caption_quality_per_fact_kind():
    from dalle3_jax.data import world

    source = world.WorldSource("eval")
    records = [source[i] for i in range(8)]
    scenes = [world.Scene.from_json(r["scene"]) for r in records]
    truth = caption_evals.caption_quality([r["captions"]["descriptive"] for r in records], scenes)
    assert truth["fact_precision"] == truth["fact_recall"] == 1.0
    for kind in ("shape", "colour", "count", "size", "place", "background"):
        assert truth[f"fact_recall/{kind}"] == 1.0, kind
    # Only the background named: every other kind is missed.
    backgrounds = [f"The background is {s.background}." for s in scenes]
    partial = caption_evals.caption_quality(backgrounds, scenes)
    assert partial["fact_recall/background"] == 1.0 and partial["fact_recall/shape"] == 0.0
    assert partial["fact_precision"] == 1.0 and 0.0 < partial["fact_recall"] < 0.5


def test_finetune_starts_from_pretrain_and_cli_matches(pretrained, tmp_path):
    pre_dir, _ = pretrained
    config = _config("captioner_descriptive", f"tiny,init_from={pre_dir}/checkpoints")
    assert config.loss.w_con == 0.0 and config.input.caption_field == "descriptive"
    workdir = str(tmp_path / "dsc")
    result = _train(config, workdir)
    # The standalone evaluator restores the same weights and decodes the same captions.
    again = caption_evals.evaluate_workdir(workdir)
    for key in ("val_loss", "fact_precision", "fact_recall", "main_subject_accuracy"):
        assert again[key] == pytest.approx(result[key], abs=1e-6), key
    # A fresh (no init_from) fine-tune starts from other weights, so its first loss differs.
    fresh = _config("captioner_descriptive", "tiny,init_from=none")
    fresh_dir = str(tmp_path / "fresh")
    _train(fresh, fresh_dir)
    first = lambda d: [r for r in metrics.read_jsonl(d) if "train/loss" in r["values"]][0]["values"]["train/loss"]  # noqa: E731
    assert first(fresh_dir) != pytest.approx(first(workdir), rel=1e-3)


def test_init_from_strict_and_loose(pretrained, tmp_path):
    """A fine-tune whose model differs from the pretrained one (no caption queries) is refused
    by default and, with init_strict=False, starts from every pretrained param it shares."""
    from flax import nnx

    from dalle3_jax import checkpoint
    from dalle3_jax.trainers import captioner

    pre_dir, _ = pretrained
    config = _config("captioner_descriptive", f"tiny,init_from={pre_dir}/checkpoints")
    config.model.n_caption_queries = 0
    config.total_steps = 1
    with pytest.raises(ValueError, match="caption_pool"):
        _train(config, str(tmp_path / "strict"), evaluate=False)
    config.init_strict = False
    config.optim.lr = 0.0  # the saved step-1 params are then exactly the initial ones
    loose = str(tmp_path / "loose")
    _train(config, loose, evaluate=False)

    def params(cfg, directory):
        model = captioner.make_model(cfg)
        checkpoint.load_model_weights(directory, model)
        flat, _ = checkpoint.flatten_state(nnx.state(model, nnx.Param))
        return {k: np.asarray(checkpoint._value(v)) for k, v in flat.items()}

    pre = params(_config("captioner_pretrain"), f"{pre_dir}/checkpoints")
    new = params(config, f"{loose}/checkpoints")
    shared = [k for k in new if k in pre]
    assert len(shared) == len(new) and any("caption_pool" in k for k in pre)
    for key in shared:
        np.testing.assert_array_equal(new[key], pre[key], err_msg=key)


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    return _strategy_run(str(tmp_path_factory.mktemp("single")), strategies.SINGLE_DEVICE)


def _strategy_run(workdir, mesh_cfg):
    """Losses of 3 tiny pretraining steps on `mesh_cfg`, and the compiled step's memory line."""
    config = _config("captioner_pretrain")
    config.total_steps, config.log_every, config.checkpoint_every = 3, 1, 100
    config.mesh.update(mesh_cfg)
    with strategies.LogLines("dalle3_jax.trainers.loop") as lines:
        _train(config, workdir, evaluate=False)
    memory = [line for line in lines if "train step compiled" in line]
    return [r["values"]["train/loss"] for r in metrics.read_jsonl(workdir) if "train/loss" in r["values"]], memory


@pytest.mark.parametrize("strategy", list(strategies.STRATEGY_MESHES))
def test_sharding_strategies_match_single_device(tmp_path, single_device_run, strategy):
    sharded, memory = _strategy_run(str(tmp_path / "sharded"), strategies.STRATEGY_MESHES[strategy])
    single, single_memory = single_device_run
    assert len(single) == len(sharded) == 3
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)
    strategies.check_memory(strategy, memory, single_memory)
