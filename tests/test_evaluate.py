"""Stage 5: the evaluation CLIP (configs/eval_clip.py), CLIP score, and launch/evaluate.py on a
tiny T2I run (CLIP score and prompt following per checkpoint, evaluation.json, TensorBoard,
skipping finished steps on a rerun), and caption quality."""

import json
import os
import shutil
import sys

import numpy as np
import pytest

from dalle3_jax import configlib, metrics, trainers
from dalle3_jax.evals import clip_score, t2i_eval
from dalle3_jax.trainers import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, os.path.join(ROOT, "launch"))


def _config(name, variant="tiny"):
    return configlib.load_config_file(os.path.join(ROOT, "configs", f"{name}.py:{variant}"))


@pytest.fixture(scope="module")
def clip_run(tmp_path_factory):
    """The tiny evaluation CLIP, trained through the shared loop (4 steps, one eval at the end)."""
    workdir = str(tmp_path_factory.mktemp("eval_clip"))
    config = _config("eval_clip")
    result = loop.train_and_evaluate(config, workdir, trainers.build_task(config, workdir))
    return workdir, result


@pytest.fixture
def t2i_run(tiny_t2i_run, tmp_path):
    """A copy of conftest's tiny T2I run (checkpoints at steps 4 and 6), so evaluating it leaves
    the shared run as it was."""
    workdir = str(tmp_path / "t2i")
    shutil.copytree(tiny_t2i_run[0], workdir)
    return workdir


def test_eval_clip_config_and_training(clip_run):
    workdir, result = clip_run
    config = _config("eval_clip")
    assert config.trainer == "clip" and config.data.split == "judge" and config.model.multimodal_layers == 0
    default = _config("eval_clip", "")
    assert default.model.image_size == default.input.image_size == 32 and default.data.world.single_object
    assert _config("eval_clip", "image_size=64,single_object=false,steps=7").total_steps == 7
    assert result["step"] == 4
    for field in ("short", "descriptive"):
        for key in ("i2t_r1", "t2i_r1", "i2t_r1_text", "t2i_r1_text"):
            assert 0.0 <= result[f"{field}/{key}"] <= 1.0, (field, key)
        assert 0.0 <= result[f"{field}/clip_score"] <= 100.0
        assert 0.0 <= result[f"{field}/swap_colour"] <= 1.0
    assert 0.0 <= result["descriptive/swap_place"] <= 1.0
    logged = [r["values"] for r in metrics.read_jsonl(workdir) if "eval/descriptive/i2t_r1" in r["values"]]
    assert logged
    bad = _config("eval_clip")
    bad.data.split = "train"
    with pytest.raises(ValueError, match="judge split only"):
        trainers.build_task(bad, workdir)


def test_clip_score_definition(clip_run):
    workdir, _ = clip_run
    scorer = clip_score.ClipScorer.from_workdir(workdir)
    assert scorer.step == 4 and scorer.image_size == 32
    images, captions, scenes = clip_score.load_judge_set({"image_size": 32, "single_object": True}, 32, 11)
    uint8 = np.round((images + 1.0) * 127.5).astype(np.uint8)
    texts = captions["descriptive"]
    ie, te = scorer.encode_images(uint8), scorer.encode_texts(texts)
    assert ie.shape == te.shape == (11, 32)  # 11 rows: the last batch of 8 is padded
    np.testing.assert_allclose(np.linalg.norm(ie, axis=1), 1.0, atol=1e-4)
    # The definition against the model's own embeddings: 100 * max(cos, 0).
    scores = scorer.score(uint8, texts)
    np.testing.assert_allclose(scores, 100 * np.maximum(np.sum(ie * te, axis=1), 0), atol=1e-3)
    np.testing.assert_allclose(clip_score.clip_score(ie, ie), 100.0, atol=1e-3)  # identical -> 100
    assert np.all(clip_score.clip_score(ie, -ie) == 0.0)  # opposite -> 0, not negative
    e = np.eye(4, dtype=np.float32)
    assert np.all(clip_score.clip_score(e, np.roll(e, 1, axis=0)) == 0.0)  # orthogonal -> 0
    np.testing.assert_allclose(clip_score.clip_score(2 * e, e), 100.0)  # scale-free
    # Float images in [0, 1] (as a sampler returns them) and other sizes score the same way.
    np.testing.assert_allclose(scorer.score(uint8.astype(np.float32) / 255.0, texts), scores, atol=1e-3)
    big = np.repeat(np.repeat(uint8, 2, axis=1), 2, axis=2)  # 64 px, resized back to 32
    assert scorer.score(big, texts).shape == (11,)
    one = scorer.score(uint8[:1], texts[:1])  # a batch of one: padding does not change scores
    np.testing.assert_allclose(one, scores[:1], atol=1e-4)
    figures = scorer.retrieval(uint8, texts)
    assert set(figures) == {"i2t_r1", "t2i_r1", "i2t_r1_text", "t2i_r1_text"}
    perfect = clip_score.retrieval_recall(ie, ie, ["a"] * 11)
    assert perfect["i2t_r1"] == 1.0 and perfect["i2t_r1_text"] == 1.0
    with pytest.raises(ValueError, match="images for"):
        scorer.score(uint8, texts[:3])
    # One fact changed at a time: a different scene, and swap accuracies for each fact kind.
    rng = np.random.default_rng(0)
    for kind in clip_score.SWAP_KINDS:
        other = clip_score.swapped_scene(scenes[0], kind, rng)
        assert other is not None and other != scenes[0]
        assert getattr(other, "background") != scenes[0].background or kind != "background"
    swaps = clip_score.swap_figures(scorer, scenes, captions, render_size=32)
    assert set(swaps) == {f"descriptive/swap_{k}" for k in clip_score.SWAP_KINDS} | {
        "descriptive/swap_mean", "short/swap_colour", "short/swap_shape", "short/swap_mean"}
    assert all(0.0 <= v <= 1.0 for v in swaps.values())


def test_select_steps():
    assert t2i_eval.select_steps("all", [4, 2]) == [2, 4]
    assert t2i_eval.select_steps("latest", [2, 4]) == [4]
    assert t2i_eval.select_steps("4,2", [2, 4]) == [2, 4]
    with pytest.raises(ValueError, match="no checkpoint for \\[3\\]"):
        t2i_eval.select_steps("3", [2, 4])
    with pytest.raises(ValueError, match="expected all, latest"):
        t2i_eval.select_steps("every", [2, 4])


def test_evaluate_cli_writes_json_and_tensorboard_and_skips_done_steps(t2i_run, clip_run, capsys, monkeypatch):
    import evaluate

    from dalle3_jax.trainers import t2i

    clip_dir, _ = clip_run
    argv = ["--workdir", t2i_run, "--clip_workdir", clip_dir, "--n_prompts", "3", "--sampler_steps", "2", "--json"]
    capsys.readouterr()
    assert evaluate.main(argv + ["--steps", "latest"]) == 0
    out = json.loads(capsys.readouterr().out)
    assert list(out["steps"]) == ["6"]
    row = out["steps"]["6"]
    for key in t2i_eval.METRICS:
        assert np.isfinite(row[key]), key
    assert 0 <= row["clip_score_gt"] <= 100 and 0 <= row["mean_fact_accuracy"] <= 1 and row["n_images"] == 3
    assert out["reference"]["mean_fact_accuracy"] == 1.0  # the world's own renders follow their prompts
    assert out["settings"]["sampler"]["steps"] == 2 and out["settings"]["clip_step"] == 4
    with open(os.path.join(t2i_run, "evaluation.json")) as f:
        assert json.load(f) == out
    tb = os.path.join(t2i_run, "evaluation")
    assert any(name.startswith("events.out.tfevents") for name in os.listdir(tb))
    assert [r["step"] for r in metrics.read_jsonl(tb) if "evaluate/clip_score_descriptive" in r["values"]] == [6]

    # --steps all adds step 4 only; then a rerun loads no model at all.
    result = t2i_eval.evaluate_t2i_run(t2i_run, clip_dir, steps="all", n_prompts=3, sampler_steps=2)
    assert list(result["steps"]) == ["4", "6"] and result["steps"]["6"] == row

    def no_loading(*args, **kwargs):
        raise AssertionError("a finished step was evaluated again")

    monkeypatch.setattr(t2i, "load_run", no_loading)
    monkeypatch.setattr(clip_score.ClipScorer, "from_workdir", no_loading)
    assert evaluate.main(argv) == 0
    assert list(json.loads(capsys.readouterr().out)["steps"]) == ["4", "6"]
    with pytest.raises(SystemExit, match="--steps given twice"):
        evaluate.main(argv + ["--steps=all", "--steps=25"])


def test_caption_quality(monkeypatch, tmp_path, capsys):
    import evaluate

    from dalle3_jax.evals import captions

    run = tmp_path / "captioner_short"
    run.mkdir()
    (run / "config.json").write_text(json.dumps({"data": {"world": {"image_size": 32, "single_object": True}}}))
    seen = {}

    def fake_eval(workdir, n=None, step=None):
        seen[workdir] = n
        return {"workdir": workdir, "fact_precision": 0.5, "fact_recall": 0.25, "main_subject_accuracy": 1.0,
                "examples": "| table |"}

    monkeypatch.setattr(captions, "evaluate_workdir", fake_eval)
    out = str(tmp_path / "report" / "caption_quality.json")
    assert evaluate.main(["--captioners", str(run), "--caption_n", "16", "--out", out, "--json"]) == 0
    quality = json.loads(capsys.readouterr().out)
    assert set(quality) == {"alt", "gt_short", "gt_descriptive", "captioner_short"}
    assert seen == {str(run): 16} and "examples" not in quality["captioner_short"]
    truth = quality["gt_descriptive"]
    assert truth["fact_precision"] == truth["fact_recall"] == truth["main_subject_accuracy"] == 1.0
    assert quality["alt"]["fact_recall"] < quality["gt_short"]["fact_recall"] < 1.0
    with open(out) as f:
        assert json.load(f) == quality
    assert t2i_eval.parse_captioners("ssc=a/b,dsc=c") == {"ssc": "a/b", "dsc": "c"}
