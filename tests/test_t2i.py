"""The T2I stage: caption blending, sharded steps, train + resume, sample.py and prompt following."""

import json
import os
import pickle
import shutil
import sys

import jax
import numpy as np
import pytest
from flax import nnx

from dalle3_jax import configlib, metrics, trainers
from dalle3_jax.data import blend, pipeline
from dalle3_jax.data.world import Group, Scene, WorldConfig, WorldSource, render
from dalle3_jax.evals import prompt_following
from dalle3_jax.trainers import loop

import strategy_helpers as strategies

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))


def _config(variant="tiny"):
    return configlib.load_config_file(os.path.join(ROOT, "configs", f"t2i.py:{variant}"))


def _train(config, workdir, evaluate=True):
    task = trainers.build_task(config, workdir)
    if not evaluate:
        task.evaluate = None  # the loss alone: no sampling programs to compile
    return loop.train_and_evaluate(config, workdir, task)


def _losses(workdir):
    return {r["step"]: r["values"]["train/loss"] for r in metrics.read_jsonl(workdir) if "train/loss" in r["values"]}


# ------------------------------------------------------------------------------------------ blending


def test_blend_is_deterministic_and_hits_the_rate():
    b = blend.CaptionBlend(field="dsc", blend=0.8, seed=3)
    ids = [f"train/{i:09d}" for i in range(20_000)]
    picks = np.array([b.uses_field(i) for i in ids])
    # Binomial standard deviation at n = 20000, p = 0.8: 0.0028.
    assert abs(picks.mean() - 0.8) < 0.01
    again = pickle.loads(pickle.dumps(b))  # as Grain's worker processes receive it
    assert [again.uses_field(i) for i in ids[:500]] == picks[:500].tolist()
    other = blend.CaptionBlend(field="dsc", blend=0.8, seed=4)
    assert [other.uses_field(i) for i in ids[:500]] != picks[:500].tolist()
    record = {"id": ids[0], "captions": {"dsc": "synthetic", "alt": "web"}}
    assert b(record, 0) == ("synthetic" if picks[0] else "web")
    with pytest.raises(KeyError, match="no caption 'dsc'"):
        blend.CaptionBlend(field="dsc", blend=1.0)({"id": "x", "captions": {"alt": "a"}}, 0)
    assert blend.from_choice("alt", 0.95, 0) == "alt"
    assert blend.from_choice("descriptive_gt", 0.95, 0).field == "descriptive"
    with pytest.raises(ValueError, match="unknown caption choice"):
        blend.from_choice("gt", 0.95, 0)


def test_blended_captions_resume_exactly():
    source = WorldSource("train", WorldConfig(image_size=32, single_object=True))
    field = blend.CaptionBlend(field="descriptive", blend=0.5, seed=0)

    def loader():
        return iter(pipeline.make_loader(source, global_batch_size=8, image_size=32, caption_field=field,
                                         max_text_len=32, keep_text=True, process_index=0, process_count=1,
                                         read_threads=1))

    it = loader()
    next(it)
    state = it.get_state()
    straight = [next(it)["caption"].tolist() for _ in range(2)]
    resumed = loader()
    resumed.set_state(state)
    assert [next(resumed)["caption"].tolist() for _ in range(2)] == straight
    texts = [c for batch in straight for c in batch]
    descriptive = [c for c in texts if len(c.split()) > 6]  # alt texts are a few words
    assert 0 < len(descriptive) < len(texts)


def test_config_variants_and_errors():
    c = _config("caption=dsc,blend=0.8,records=/data/recaptioned,single_object=false")
    assert (c.caption, c.blend, c.data.source, c.data.arrayrecord_pattern) == ("dsc", 0.8, "arrayrecord",
                                                                               "/data/recaptioned")
    assert c.input.max_text_len == 80 and not c.data.world.single_object
    d = _config("")
    assert (d.caption, d.diffusion.prediction, d.diffusion.weighting, d.optim.lr) == (
        "descriptive_gt", "v", "min_snr_plus_one", 2e-3)
    assert d.model.unet.channel_mult == (1, 2, 4) and d.input.global_batch_size == 128
    with pytest.raises(ValueError, match="unknown config variant key"):
        _config("captions=dsc")
    bad = _config("tiny")
    bad.diffusion.prediction, bad.diffusion.weighting = "eps", "min_snr"
    with pytest.raises(ValueError, match="eps prediction cannot"):
        trainers.build_task(bad, "/tmp/unused")


# ------------------------------------------------------------------------------------------ training


@pytest.fixture(scope="module")
def run_dir(tiny_t2i_run):
    """conftest's tiny run: 6 steps on all 8 devices (data=8), logging every step, with its
    end-of-run evaluation; checkpoints at 4 and 6. Its losses are also the data=8 case of the
    sharding test."""
    return tiny_t2i_run


def _three_steps(workdir, mesh_cfg):
    """Losses of 3 tiny steps on `mesh_cfg`, and the loop's "train step compiled ...; per device" line."""
    config = _config()
    config.total_steps, config.log_every, config.checkpoint_every = 3, 1, 100
    config.mesh.update(mesh_cfg)
    with strategies.LogLines("dalle3_jax.trainers.loop") as lines:
        _train(config, workdir, evaluate=False)
    return [v for _, v in sorted(_losses(workdir).items())], [line for line in lines if "train step compiled" in line]


@pytest.fixture(scope="module")
def single_device_run(tmp_path_factory):
    return _three_steps(str(tmp_path_factory.mktemp("single")), strategies.SINGLE_DEVICE)


# ("fsdp" for this model runs across two processes in tests/test_distributed.py.)
@pytest.mark.parametrize("strategy", ["dp", "fsdp_tp"])
def test_sharding_strategies_match_single_device(run_dir, single_device_run, tmp_path, strategy):
    single, single_memory = single_device_run
    if strategy == "dp":
        # run_dir is the dp strategy (mesh.data=-1). The schedule is constant after one warm-up
        # step, so its first 3 steps are the same optimisation as a 3-step run's.
        sharded = [v for s, v in sorted(_losses(run_dir[0]).items()) if s <= 3]
    else:
        sharded, memory = _three_steps(str(tmp_path / strategy), strategies.STRATEGY_MESHES[strategy])
        strategies.check_memory(strategy, memory, single_memory)
    assert len(single) == len(sharded) == 3
    np.testing.assert_allclose(sharded, single, rtol=0, atol=1e-5)


def test_run_logs_evals_and_sample_grids(run_dir):
    workdir, result = run_dir
    assert result["step"] == 6
    for key in ("val_loss", "pf_shape", "pf_colour", "pf_count", "pf_size", "pf_place", "pf_all_facts_correct",
                "pf_mean_fact_accuracy"):
        assert np.isfinite(result[key]), key
    assert os.path.exists(os.path.join(workdir, "samples", "step_000006.png"))
    logged = [r for r in metrics.read_jsonl(workdir, kind="images") if "eval/samples" in r["values"]]
    assert logged and logged[-1]["values"]["eval/samples"][2] == 3


def test_resume_continues_exactly(run_dir, tmp_path):
    from dalle3_jax.trainers import t2i

    workdir, _ = run_dir
    resumed = str(tmp_path / "resumed")
    shutil.copytree(workdir, resumed)
    shutil.rmtree(os.path.join(resumed, "checkpoints", "6"))  # as if killed after the step-4 save
    config = _config()
    config.total_steps, config.log_every, config.checkpoint_every = 6, 1, 4
    assert _train(config, resumed, evaluate=False)["step"] == 6
    a, b = _losses(resumed), _losses(workdir)  # the resumed run's records come last and win
    # Same params, optimizer moments, data position and caption choices after the resume ...
    assert a[5] == b[5] and a[6] == b[6]
    # ... and the same EMA weights, which the loss does not see.
    ema = [nnx.state(t2i.load_run(d)[1], nnx.Param) for d in (workdir, resumed)]
    for x, y in zip(jax.tree.leaves(ema[0]), jax.tree.leaves(ema[1])):
        np.testing.assert_array_equal(np.asarray(x), np.asarray(y))


def test_trains_on_recaptioned_records(tmp_path):
    # Records as the recaption job writes them: the world's records plus `ssc` / `dsc` captions.
    from dalle3_jax.data.sources import ArrayRecordShardWriter

    source = WorldSource("train", WorldConfig(image_size=32, single_object=True))
    with ArrayRecordShardWriter(str(tmp_path / "recaptioned" / "recaptioned-00000-of-00001.array_record")) as w:
        for i in range(48):
            rec = source[i]
            rec["captions"].update(dsc="DSC " + rec["captions"]["descriptive"], ssc=rec["captions"]["short"])
            w.write(rec)
    config = _config(f"tiny,caption=dsc,blend=0.5,records={tmp_path / 'recaptioned'}")
    assert config.data.source == "arrayrecord"
    config.total_steps, config.checkpoint_every = 2, 2
    task = trainers.build_task(config, str(tmp_path / "run"))
    batch = next(iter(task.train_data()))
    assert batch["tokens"].shape == (16, 32)
    task.evaluate = None
    assert loop.train_and_evaluate(config, str(tmp_path / "run"), task)["step"] == 2
    with pytest.raises(FileNotFoundError, match="no ArrayRecord files"):
        trainers.build_task(_config(f"tiny,caption=ssc,records={tmp_path / 'missing'}"), str(tmp_path / "x"))


def test_sample_cli_writes_a_grid(run_dir, tmp_path, capsys):
    import sample

    workdir, _ = run_dir
    prompts = tmp_path / "prompts.txt"
    prompts.write_text("# comment\na small red circle at the top left\n\none large blue square in the center\n")
    out = str(tmp_path / "grid.png")
    assert sample.main(["--workdir", workdir, "--prompts_file", str(prompts), "--n", "2", "--sampler", "dpmpp_2m",
                        "--guidance", "2", "--out", out]) == 0
    from PIL import Image

    grid = np.asarray(Image.open(out))
    assert grid.shape == (2 * 34 + 2, 2 * 34 + 2, 3)  # 2 prompts x 2 images of 32 px, 2 px borders
    assert open(out[:-4] + ".txt").read().splitlines() == ["a small red circle at the top left",
                                                           "one large blue square in the center"]
    with pytest.raises(SystemExit, match="not found"):
        sample.main(["--workdir", workdir, "--prompts_file", str(tmp_path / "missing.txt")])
    with pytest.raises(FileNotFoundError, match="config.json"):
        sample.main(["--workdir", str(tmp_path), "--prompt", "a red circle"])


def test_prompt_following_cli(run_dir, capsys):
    workdir, _ = run_dir
    capsys.readouterr()
    assert prompt_following.main(["--workdir", workdir, "--json", "--n_single", "4", "--n_multi", "2"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == 6 and out["n_images"] == 4 and out["multi_object"]["n_images"] == 2
    for figures in (out, out["multi_object"]):
        for key in prompt_following.FACTS + ("mean_fact_accuracy", "all_facts_correct", "background"):
            assert 0.0 <= figures[key] <= 1.0, key


def test_prompt_following_scores_true_renders_perfectly():
    # The scorer itself, on images that do follow their prompts (the world's own renders), on
    # a wrong image, and on an empty one.
    prompts = prompt_following.load_prompts(_config(), 6, single_object=False)
    images = np.stack([render(s, 64) for s in prompts.scenes])
    perfect = prompt_following.score_images(images, prompts.scenes)
    assert perfect["all_facts_correct"] == 1.0 and perfect["mean_fact_accuracy"] == 1.0
    truth = Scene("gray", False, (Group("circle", "red", "large", ("top left",)),))
    wrong = Scene("gray", False, (Group("square", "red", "small", ("center",)),))
    scores = prompt_following.score_images(np.stack([render(wrong, 32)]), [truth])
    assert (scores["shape"], scores["colour"], scores["size"], scores["place"]) == (0.0, 1.0, 0.0, 0.0)
    empty = Scene("gray", False, ())
    assert prompt_following.score_images(np.stack([render(empty, 32)]), [truth])["colour"] == 0.0
