"""The learned prompt upsampler: model masking and cached decoding, pairs from records, training
through the shared loop, Upsampler.upsample (shapes, seeds, bad input) and launch/sample.py's
--upsample=learned."""

import argparse
import importlib.util
import os

import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

from dalle3_jax import configlib, metrics, models, trainers
from dalle3_jax.data import records, sources
from dalle3_jax.data import tokenizer as tokenizer_lib
from dalle3_jax.recaption import decode
from dalle3_jax.trainers import loop
from dalle3_jax.trainers import upsampler as trainer
from dalle3_jax.upsample import learned

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
PROMPTS = ["a red circle", "three blue squares", "two green stars"]


def _config(variant="tiny"):
    return configlib.load_config_file(os.path.join(ROOT, "configs", f"upsampler.py:{variant}"))


@pytest.fixture(scope="module")
def run(tmp_path_factory):
    workdir = str(tmp_path_factory.mktemp("upsampler"))
    config = _config()
    result = loop.train_and_evaluate(config, workdir, trainers.build_task(config, workdir))
    return workdir, result


@pytest.fixture(scope="module")
def upsampler(run):
    return learned.Upsampler.from_workdir(run[0])


def test_model_masks_source_padding_and_caches_like_the_reference():
    model = models.get("upsampler", models.config("upsampler", "tiny", vocab_size=64, max_source_len=12,
                                                  max_target_len=10))
    short = jnp.array([[1, 5, 6, 7, 2, 0], [1, 9, 2, 0, 0, 0]], jnp.int32)
    longer = jnp.pad(short, ((0, 0), (0, 6)))  # more padding (and whatever follows eos) changes nothing
    longer = longer.at[1, 4].set(33)
    target = jnp.array([[1, 11, 12, 2, 0], [1, 13, 2, 0, 0]], jnp.int32)
    forward = nnx.jit(lambda m, source, tokens: m(source, tokens))
    np.testing.assert_allclose(forward(model, short, target), forward(model, longer, target), atol=1e-5)
    cached = decode.generate(model, longer, max_len=9)
    np.testing.assert_array_equal(cached, decode.generate_uncached(model, longer, max_len=9))
    assert cached.shape == (2, 9)
    with pytest.raises(ValueError, match="exceeds max_source_len"):
        model(jnp.ones((1, 13), jnp.int32), target[:1])


def test_config_variants():
    c = _config("records=/data/recaption,single_object=false")
    assert (c.data.records, c.data.source_caption, c.data.target_caption) == ("/data/recaption", "ssc", "dsc")
    assert c.model.max_target_len == 80 and not c.data.world.single_object
    c = _config("")
    assert c.data.records == "" and (c.data.source_caption, c.data.target_caption) == ("short", "descriptive")
    assert c.data.split == "finetune" and c.model.max_target_len == 32 and c.data.world.single_object
    with pytest.raises(ValueError, match="unknown config variant key 'recs'"):
        _config("recs=x")


def _record(i, ssc, dsc):
    image = records.encode_image(np.full((16, 16, 3), 128, np.uint8))
    return {"id": f"r{i}", "image": image, "captions": {"alt": "x", "ssc": ssc, "dsc": dsc}}


def test_pairs_from_recaptioned_records(tmp_path):
    out = tmp_path / "recaption"
    with sources.ArrayRecordShardWriter(str(out / "recaptioned-00000-of-00001.array_record")) as w:
        for i in range(40):
            w.write(_record(i, f"a red circle {i}" if i != 3 else "", "A big red circle sits at the top."))
    config = _config(f"tiny,records={out}")
    config.data.n_holdout = 8
    tokenize = tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer())
    train, val = trainer.load_pairs(config, tokenize)
    assert len(train) == 31 and len(val) == 8  # 32 before the held-out 8, less one empty SSC caption
    assert train.prompts[0] == "a red circle 0" and val.prompts[0] == "a red circle 32"
    assert train.source.shape == (31, config.model.max_source_len)
    assert train.tokens.shape == (31, config.model.max_target_len)
    batch = next(iter(trainer.make_loader(train, 8, seed=0)))
    assert batch["source"].shape == (8, config.model.max_source_len) and batch["tokens"].dtype == np.int32
    config.data.target_caption = "descriptive"
    with pytest.raises(KeyError, match="no caption 'descriptive'"):
        trainer.load_pairs(config, tokenize)


def test_trains_through_the_loop_with_evals(run):
    workdir, result = run
    assert result["step"] == 4
    for key in ("val_loss", "val_token_accuracy", "keeps_facts", "keeps_shape", "keeps_colour", "keeps_count",
                "facts_added", "complete", "words"):
        assert np.isfinite(result[key]), key
    texts = metrics.read_jsonl(workdir, kind="texts")
    assert "| prompt | upsampled |" in texts[-1]["values"]["eval/upsamples"]


def test_upsample_shapes_seeds_and_batching(upsampler):
    a = upsampler.upsample(PROMPTS, seed=0)
    assert len(a) == 3 and all(isinstance(t, str) for t in a)
    assert upsampler.upsample(PROMPTS, seed=0) == a  # deterministic given the seed
    assert upsampler.upsample(PROMPTS, seed=1) != a
    # Prompt i draws from fold_in(seed, i), whatever the batch it lands in.
    upsampler.batch_size = 8
    many = PROMPTS * 4
    small_batches = upsampler.upsample(many, seed=0)
    upsampler.batch_size = 64
    assert upsampler.upsample(many, seed=0) == small_batches and small_batches[:3] == a
    tokens = upsampler.upsample_tokens(upsampler.encode(PROMPTS), max_len=7, method="beam", beam_size=2)
    assert tokens.shape == (3, 7) and tokens.dtype == np.int32
    assert upsampler.upsample([]) == []


def test_bad_prompts_and_settings(upsampler):
    with pytest.raises(learned.PromptError, match="prompt 1 is empty"):
        upsampler.upsample(["a red circle", "  "])
    with pytest.raises(learned.PromptError, match="list of strings"):
        upsampler.upsample("a red circle")
    long = " ".join(["a big red circle"] * 10)
    with pytest.raises(learned.PromptError, match=r"prompt 0 .* tokens .* max_source_len=16"):
        upsampler.upsample([long])
    assert len(upsampler.upsample([long], truncate=True)) == 1
    with pytest.raises(ValueError, match="unknown decode settings"):
        upsampler.upsample(PROMPTS, temprature=0.5)
    with pytest.raises(ValueError, match="exceeds the model's position table"):
        upsampler.upsample(PROMPTS, max_len=64)


def test_fact_report_on_ground_truth():
    from dalle3_jax.data.world import World, WorldConfig

    world = World(WorldConfig())
    examples = [world.text_example("eval", i)["captions"] for i in range(32)]
    shorts = [e["short"] for e in examples]
    truth = learned.fact_report(shorts, [e["descriptive"] for e in examples])
    assert truth["keeps_facts"] == truth["complete"] == 1.0 and truth["facts_added"] > 3
    echo = learned.fact_report(shorts, shorts)
    assert echo["keeps_facts"] == 1.0 and echo["facts_added"] == 0.0 and echo["complete"] == 0.0
    wrong = learned.fact_report(["three blue squares"], ["Two blue squares sit at the top and the left."])
    assert wrong["keeps_facts"] == wrong["keeps_count"] == 0.0 and wrong["keeps_shape"] == 1.0


def _sample_cli():
    path = os.path.join(ROOT, "launch", "sample.py")
    spec = importlib.util.spec_from_file_location("launch_sample_cli_learned", path)
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def test_sample_cli_upsample_learned(run, upsampler, capsys, monkeypatch):
    cli = _sample_cli()
    parser = argparse.ArgumentParser()
    parser.add_argument("--seed", type=int, default=0)
    cli.add_upsample_flags(parser)
    args = parser.parse_args(["--upsample=learned", "--upsampler_workdir", run[0], "--seed", "3"])
    assert cli.upsample_prompts(args, PROMPTS) == upsampler.upsample(PROMPTS, seed=3)
    assert "upsampled 'a red circle' -> " in capsys.readouterr().out
    # The decoding flags reach Upsampler.upsample (recorded, so no other program compiles).
    calls = []
    monkeypatch.setattr(learned.Upsampler, "upsample", lambda self, prompts, **kw: calls.append(kw) or prompts)
    cli.upsample_prompts(parser.parse_args(["--upsample=learned", "--upsampler_workdir", run[0], "--upsample_method",
                                            "beam", "--upsample_temperature", "0.7", "--upsample_top_p", "0.8",
                                            "--upsample_top_k", "5"]), PROMPTS)
    assert calls == [dict(seed=0, method="beam", temperature=0.7, top_p=0.8, top_k=5)]
    monkeypatch.undo()
    with pytest.raises(SystemExit, match="needs --upsampler_workdir"):
        cli.upsample_prompts(parser.parse_args(["--upsample=learned"]), PROMPTS)
    with pytest.raises(SystemExit, match="--upsample=learned: .*prompt 0 is empty"):
        cli.upsample_prompts(args, [""])
    with pytest.raises(SystemExit, match="config.json not found"):
        cli.upsample_prompts(parser.parse_args(["--upsample=learned", "--upsampler_workdir", "/nonexistent"]), PROMPTS)
