"""Tests for the caption tokenizer (dalle3_jax/data/tokenizer.py) and its packaged files."""

import json
import os

import numpy as np
import pytest

from dalle3_jax.data import tokenizer as tokenizer_lib
from dalle3_jax.data.tokenizer import BOS_ID, EOS_ID, PAD_ID, UNK_ID


@pytest.fixture(scope="module")
def tok():
    return tokenizer_lib.load_tokenizer()


@pytest.fixture(scope="module")
def world_captions():
    from dalle3_jax.data.world import WorldConfig, WorldSource

    source = WorldSource("finetune", WorldConfig(seed=0))
    caps = [source[i]["captions"] for i in range(40)]
    return [c[k] for c in caps for k in ("descriptive", "short", "alt")]


def test_packaged_dir_loads_with_auto_tokenizer():
    from transformers import AutoTokenizer

    hf = AutoTokenizer.from_pretrained(tokenizer_lib.PACKAGED_TOKENIZER_DIR)
    # Training saturates just under 1024: every pair seen twice in the world language is merged.
    assert 768 <= len(hf) <= 2048
    assert (hf.pad_token_id, hf.bos_token_id, hf.eos_token_id, hf.unk_token_id) == (PAD_ID, BOS_ID, EOS_ID, UNK_ID)
    assert hf.convert_ids_to_tokens([0, 1, 2, 3]) == ["<pad>", "<bos>", "<eos>", "<unk>"]
    # The HF call path adds the same bos/eos as encode_batch.
    ids = hf("two red circles")["input_ids"]
    tokens, lengths = tokenizer_lib.encode_batch(hf, ["two red circles"], 16)
    assert ids == list(tokens[0, : lengths[0]])


def test_round_trip_world_captions(tok, world_captions):
    tokens, lengths = tokenizer_lib.encode_batch(tok, world_captions, 256)
    assert tokens.dtype == np.int32 and lengths.dtype == np.int32
    assert (tokens[:, 0] == BOS_ID).all()
    assert (tokens[np.arange(len(lengths)), lengths - 1] == EOS_ID).all()
    assert not (tokens == UNK_ID).any()
    assert tokenizer_lib.decode(tok, tokens) == world_captions
    # The world's language is compact: a word is mostly one token.
    words = sum(len(t.split()) for t in world_captions)
    assert (lengths - 2).sum() < 1.6 * words


def test_truncation_keeps_eos_and_padding(tok):
    long_text = " ".join(["three large green triangles in the bottom right"] * 20)
    tokens, lengths = tokenizer_lib.encode_batch(tok, [long_text, "a blue square"], 12)
    assert tokens.shape == (2, 12)
    assert lengths[0] == 12 and tokens[0, -1] == EOS_ID and tokens[0, 0] == BOS_ID
    assert tokens[1, lengths[1] - 1] == EOS_ID and (tokens[1, lengths[1] :] == PAD_ID).all()
    assert tokenizer_lib.decode(tok, tokens[0]) == tokenizer_lib.decode(tok, tokens[0, 1:11])
    assert long_text.startswith(tokenizer_lib.decode(tok, tokens[0]))
    with pytest.raises(ValueError, match="no room"):
        tokenizer_lib.encode_batch(tok, ["x"], 2)


def test_decode_stops_at_first_eos(tok):
    a, _ = tokenizer_lib.encode_batch(tok, ["red"], 4)
    b, _ = tokenizer_lib.encode_batch(tok, ["blue"], 4)
    ids = [BOS_ID, int(a[0, 1]), EOS_ID, int(b[0, 1]), EOS_ID, PAD_ID]
    assert tokenizer_lib.decode(tok, ids) == "red"
    assert tokenizer_lib.decode(tok, [int(a[0, 1]), PAD_ID, int(b[0, 1])]) == "red blue"


@pytest.mark.parametrize(
    "text",
    ["", " ", "naïve café 東京 🎨🟥 ∑", "IMG_0042.JPG", "BUY NOW!!! 50% off -> www.example.com/shop?id=7",
     "\x00\t\n\r", "x" * 100_000, ("word " * 30_000)],
)
def test_weird_strings_encode(tok, text):
    tokens, lengths = tokenizer_lib.encode_batch(tok, [text], 32)
    assert tokens.shape == (1, 32) and 2 <= lengths[0] <= 32
    assert not (tokens == UNK_ID).any()  # byte-level: nothing is unknown
    out = tokenizer_lib.decode(tok, tokens[0])
    assert isinstance(out, str)
    if lengths[0] < 32 and text.strip() == text:  # not truncated: exact round trip
        assert out == text


def test_empty_batch_and_none(tok):
    tokens, lengths = tokenizer_lib.encode_batch(tok, [], 8)
    assert tokens.shape == (0, 8) and lengths.shape == (0,)
    tokens, lengths = tokenizer_lib.encode_batch(tok, [None], 8)
    assert list(tokens[0, :2]) == [BOS_ID, EOS_ID] and lengths[0] == 2


def _word_level_dir(path, specials):
    """A tiny Hugging Face WordLevel tokenizer directory (the kind an imported encoder ships)."""
    from tokenizers import Tokenizer, models, pre_tokenizers

    vocab = {name: i for i, name in enumerate(list(specials.values()) + ["[UNK]", "red", "blue", "square"])}
    wl = Tokenizer(models.WordLevel(vocab, unk_token="[UNK]"))
    wl.pre_tokenizer = pre_tokenizers.Whitespace()
    os.makedirs(path, exist_ok=True)
    wl.save(os.path.join(path, "tokenizer.json"))
    config = {"tokenizer_class": "PreTrainedTokenizerFast", "unk_token": "[UNK]", **specials}
    with open(os.path.join(path, "tokenizer_config.json"), "w") as f:
        json.dump(config, f)
    return vocab


def test_local_word_level_tokenizer_with_cls_sep_fallbacks(tmp_path):
    vocab = _word_level_dir(tmp_path / "bert", {"pad_token": "[PAD]", "cls_token": "[CLS]", "sep_token": "[SEP]"})
    tok = tokenizer_lib.load_tokenizer(str(tmp_path / "bert"))
    ids = tokenizer_lib.SpecialIds.of(tok)
    assert (ids.pad, ids.bos, ids.eos) == (vocab["[PAD]"], vocab["[CLS]"], vocab["[SEP]"])
    tokens, lengths = tokenizer_lib.encode_batch(tok, ["red square", "blue green"], 6)
    assert list(tokens[0]) == [vocab[w] for w in ("[CLS]", "red", "square", "[SEP]", "[PAD]", "[PAD]")]
    assert list(tokens[1, :4]) == [vocab["[CLS]"], vocab["blue"], vocab["[UNK]"], vocab["[SEP]"]]
    assert tokenizer_lib.decode(tok, tokens[0]) == "red square"


def test_local_tokenizer_without_special_tokens(tmp_path):
    vocab = _word_level_dir(tmp_path / "bare", {})
    tok = tokenizer_lib.load_tokenizer(str(tmp_path / "bare"))
    ids = tokenizer_lib.SpecialIds.of(tok)
    assert (ids.pad, ids.bos, ids.eos) == (0, None, None)
    tokens, lengths = tokenizer_lib.encode_batch(tok, ["red square blue"], 2)
    assert list(tokens[0]) == [vocab["red"], vocab["square"]] and lengths[0] == 2  # plain cut


def test_missing_tokenizer_is_a_clear_error(tmp_path):
    with pytest.raises(FileNotFoundError, match="does not exist"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "nowhere"))
    (tmp_path / "empty").mkdir()
    (tmp_path / "empty" / "README").write_text("no tokenizer here")
    with pytest.raises(FileNotFoundError, match="holds no tokenizer"):
        tokenizer_lib.load_tokenizer(str(tmp_path / "empty"))


def test_train_cli_writes_a_loadable_tokenizer(tmp_path, capsys):
    out = str(tmp_path / "tok")
    assert tokenizer_lib.main(["train", "--out", out, "--n", "600", "--vocab-size", "400", "--stats-n", "50"]) == 0
    report = json.loads(capsys.readouterr().out)
    tok = tokenizer_lib.load_tokenizer(out)
    assert report["vocab_size"] == len(tok) <= 400
    assert report["descriptive"]["max"] >= report["descriptive"]["mean"] > report["short"]["mean"]
    tokens, _ = tokenizer_lib.encode_batch(tok, ["a small purple circle"], 16)
    assert tokenizer_lib.decode(tok, tokens[0]) == "a small purple circle"


def test_tokenize_pickles_for_worker_processes(tok):
    import pickle

    t = pickle.loads(pickle.dumps(tokenizer_lib.Tokenize(tok)))
    tokens, _ = t.encode_batch(["one big yellow star"], 12)
    np.testing.assert_array_equal(tokens, tokenizer_lib.encode_batch(tok, ["one big yellow star"], 12)[0])
