"""Pretrained T5 encoder import (dalle3_jax/weights/t5.py): parity with transformers on PyTorch CPU
for the v1.0 (ReLU) and v1.1 (gated GELU) layouts, sharded loading on an fsdp x tensor mesh, clear
errors, and a T2I train step with the imported encoder frozen."""

import json
import os
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from flax import nnx

torch = pytest.importorskip("torch")
transformers = pytest.importorskip("transformers")

from dalle3_jax import optim, sharding  # noqa: E402
from dalle3_jax.weights import safetensors_io as sio  # noqa: E402
from dalle3_jax.weights import t5 as t5_weights  # noqa: E402

PAD, EOS = 0, 1
# Two layouts; the gated one has an inner attention width (4 heads x 12) unlike d_model (32).
LAYOUTS = {
    "v1_0": dict(feed_forward_proj="relu", d_kv=8, cls="T5EncoderModel"),
    "v1_1": dict(feed_forward_proj="gated-gelu", d_kv=12, cls="T5ForConditionalGeneration"),
}
WORDS = ("a an the one two three four small large big red green blue yellow purple orange white black circle "
         "circles square squares triangle triangles star stars at in on of and top bottom left right center "
         "middle background with is there picture image").split()


def _tokens() -> np.ndarray:
    """[4, 12] ids: text, then eos, then padding (and one row without padding)."""
    rng = np.random.default_rng(0)
    rows = []
    for n in (3, 11, 7, 1):
        row = np.full(12, PAD, np.int32)
        row[:n] = rng.integers(3, 100, n)
        row[n] = EOS
        rows.append(row)
    return np.stack(rows)


def _save_tokenizer(path: str) -> None:
    """A word-level tokenizer with T5's special ids (pad 0, eos 1, unk 2) as tokenizer.json."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {w: i for i, w in enumerate(["<pad>", "</s>", "<unk>", *WORDS])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    fast = transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", eos_token="</s>",
                                                unk_token="<unk>")
    fast.save_pretrained(path)


@pytest.fixture(scope="module")
def checkpoints(tmp_path_factory):
    """{layout: (directory, HF last_hidden_state [4, 12, 32] on _tokens())}: small random T5s."""
    torch.manual_seed(0)
    tokens = _tokens()
    mask = torch.tensor((np.cumsum(tokens == EOS, axis=1) - (tokens == EOS) == 0) & (tokens != PAD))
    out = {}
    for name, spec in LAYOUTS.items():
        cfg = transformers.T5Config(vocab_size=100, d_model=32, d_kv=spec["d_kv"], num_heads=4, d_ff=64,
                                    num_layers=2, num_decoder_layers=1, feed_forward_proj=spec["feed_forward_proj"],
                                    relative_attention_num_buckets=8, relative_attention_max_distance=20,
                                    pad_token_id=PAD, eos_token_id=EOS, decoder_start_token_id=PAD)
        model = getattr(transformers, spec["cls"])(cfg).eval()
        path = str(tmp_path_factory.mktemp(f"t5_{name}"))
        model.save_pretrained(path, safe_serialization=True)
        encoder = model if spec["cls"] == "T5EncoderModel" else model.get_encoder()
        with torch.no_grad():
            ref = encoder(input_ids=torch.tensor(tokens, dtype=torch.long), attention_mask=mask.long())
        out[name] = (path, ref.last_hidden_state.numpy())
    return out


@pytest.mark.parametrize("layout", sorted(LAYOUTS))
def test_matches_transformers(checkpoints, layout):
    path, ref = checkpoints[layout]
    encoder, info = t5_weights.load_t5_encoder(path)
    assert info["report"].unfilled == [] and info["report"].unused_keys == []
    if LAYOUTS[layout]["cls"] != "T5EncoderModel":  # the decoder is skipped by name, not silently
        assert any(k.startswith("decoder.") for k in info["report"].ignored_keys)
    assert info["config"].feed_forward == ("relu" if layout == "v1_0" else "gated-gelu_new")
    enc = encoder(_tokens())
    # Every position, padding included (padded queries attend to the real keys in both).
    np.testing.assert_allclose(np.asarray(enc.states), ref, atol=1e-4, rtol=0)
    assert np.asarray(enc.mask).sum() == 3 + 11 + 7 + 1 + 4  # text + eos per row


def test_sharded_load_splits_weights_and_matches(checkpoints):
    path, ref = checkpoints["v1_1"]
    mesh = sharding.make_mesh(dict(data=1, fsdp=4, tensor=2))
    encoder, _ = t5_weights.load_t5_encoder(path, mesh=mesh)
    query = encoder.blocks[0].attn.query.kernel[...]  # [D, H, K]: width over fsdp, heads over tensor
    assert query.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor", None)
    assert query.addressable_shards[0].data.shape == (32 // 4, 4 // 2, 12)
    wi = encoder.blocks[1].mlp.wi_linear.kernel[...]
    assert wi.addressable_shards[0].data.size == wi.size // 8
    assert encoder.token_embed[...].addressable_shards[0].data.size == 100 * 32 // 8  # vocab/tensor, embed/fsdp
    graphdef, state = nnx.split(encoder)
    with jax.set_mesh(mesh):
        tokens = jax.device_put(_tokens(), sharding.batch_sharding(mesh, 2))
        states = jax.jit(lambda s, t: nnx.merge(graphdef, s)(t).states)(state, tokens)
    np.testing.assert_allclose(np.asarray(states), ref, atol=1e-5, rtol=0)


def test_clear_errors(checkpoints, tmp_path):
    with pytest.raises(sio.CheckpointError, match="does not exist"):
        t5_weights.load_t5_encoder(str(tmp_path / "missing"))
    src, _ = checkpoints["v1_0"]
    bad = str(tmp_path / "bad")
    shutil.copytree(src, bad)
    with open(os.path.join(bad, "config.json")) as f:
        hf = json.load(f)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**hf, "d_ff": 48}, f)  # the config disagrees with the tensors
    with pytest.raises(sio.CheckpointError) as err:
        t5_weights.load_t5_encoder(bad)
    msg = str(err.value)
    assert "blocks.0.mlp.wi.kernel" in msg and "encoder.block.0.layer.1.DenseReluDense.wi.weight" in msg
    assert "(32, 48)" in msg and "(64, 32)" in msg
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**hf, "feed_forward_proj": "gated-relu"}, f)  # wi_0 / wi_1 missing, wi unused
    with pytest.raises(sio.CheckpointError, match="DenseReluDense.wi_0.weight"):
        t5_weights.load_t5_encoder(bad)
    with open(os.path.join(bad, "config.json"), "w") as f:
        json.dump({**hf, "feed_forward_proj": "swish-relu"}, f)
    with pytest.raises(sio.CheckpointError, match="feed_forward_proj"):
        t5_weights.load_t5_encoder(bad)


def test_t2i_step_keeps_pretrained_encoder_frozen(checkpoints, tmp_path):
    from dalle3_jax.trainers import loop
    from dalle3_jax.trainers import t2i as t2i_trainer

    src, _ = checkpoints["v1_0"]
    pretrained = str(tmp_path / "t5")
    shutil.copytree(src, pretrained)
    config = t2i_trainer.default_config(smoke=True)
    config.model.text_pretrained = pretrained
    config.optim.warmup_steps = 0  # the first step already moves the UNet
    with pytest.raises(FileNotFoundError, match="tokenizer.json"):
        t2i_trainer.build_task(config, str(tmp_path / "run"))
    _save_tokenizer(pretrained)
    task = t2i_trainer.build_task(config, str(tmp_path / "run"))
    assert config.optim.frozen == t2i_trainer.FROZEN_TEXT
    tokenize = t2i_trainer.load_tokenize(config)
    assert (tokenize.ids.pad, tokenize.ids.eos, tokenize.ids.bos) == (PAD, EOS, None)

    mesh = sharding.make_mesh(dict(data=2, fsdp=2, tensor=2))
    tx = optim.make_optimizer(config.optim, int(config.total_steps))

    def ctor():
        model = task.make_model()
        return loop.TrainState(model, tx, task.make_extra(model))

    with jax.set_mesh(mesh):
        ts = sharding.create_sharded(ctor, mesh)
        task.init_weights(ts)
        hf_encoder, _ = t5_weights.load_t5_encoder(pretrained)
        text_before = jax.tree.map(np.asarray, nnx.state(ts.model.text, nnx.Param))
        unet_before = jax.tree.map(np.asarray, nnx.state(ts.model.unet, nnx.Param))
        for a, b, c in zip(jax.tree.leaves(text_before), jax.tree.leaves(nnx.state(hf_encoder, nnx.Param)),
                           jax.tree.leaves(nnx.state(ts.extra.model.text, nnx.Param))):
            np.testing.assert_array_equal(a, np.asarray(b))  # the imported weights, in the EMA copy too
            np.testing.assert_array_equal(a, np.asarray(c))
        size = config.model.unet.image_size
        tokens, _ = tokenize.encode_batch(["a small red circle at the top left"] * 8, config.input.max_text_len)
        batch = sharding.global_batch({"image": np.random.default_rng(0).uniform(-1, 1, (8, size, size, 3))
                                       .astype(np.float32), "tokens": tokens}, mesh)
        graphdef, compiled, _ = loop.compile_train_step(task, ts, batch, jax.random.key(0))
        state, metrics = compiled(nnx.state(ts), batch, jax.random.key(0))
        ts = nnx.merge(graphdef, state)
    assert np.isfinite(float(metrics["loss"]))
    # optim.frozen leaves the encoder without optimizer moments (none to shard, none to save).
    opt_paths = [optim._path(p) for p, _ in jax.tree_util.tree_flatten_with_path(nnx.state(ts.opt))[0]]
    assert any("/unet/" in p for p in opt_paths) and not any("/text/" in p for p in opt_paths)
    for a, b in zip(jax.tree.leaves(text_before), jax.tree.leaves(nnx.state(ts.model.text, nnx.Param))):
        np.testing.assert_array_equal(a, np.asarray(b))
    # The UNet trains (its zero-initialised output layer is what a first step can move).
    out_before = np.asarray(unet_before["conv_out"]["kernel"])
    assert not np.array_equal(out_before, np.asarray(ts.model.unet.conv_out.kernel[...]))


def test_bfloat16_compute_stays_close(checkpoints):
    path, ref = checkpoints["v1_1"]
    encoder, _ = t5_weights.load_t5_encoder(path, dtype="bfloat16")
    assert encoder.token_embed[...].dtype == jnp.float32  # float32 master weights
    states = np.asarray(encoder(_tokens()).states, np.float32)
    assert np.max(np.abs(states - ref)) < 0.1 * np.max(np.abs(ref))
