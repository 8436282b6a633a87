"""The caption tokenizer: a small byte-level BPE trained on the shapes world's caption language.

Every text model in the recipe (the CoCa captioner's decoder, the T2I text encoder, the
evaluation CLIP) shares one tokenizer, so token ids mean the same thing at every stage.

Why byte-level BPE with a small vocabulary:
  * byte-level: any string encodes, without an unknown token. Alt-text is web-like on purpose
    (file names, ads, emoji, other scripts), and the recaptioner may emit anything.
  * about 1024 entries: the world's language is a few hundred words, so 1024 covers every word
    of it as one or two tokens, and a small vocabulary keeps the decoder's softmax cheap.

Special tokens have fixed ids in the packaged tokenizer (and in any trained by `train`):

    pad = 0   <pad>   fills sequences to a static length; ignored by losses (mask on text_len)
    bos = 1   <bos>   first token of every encoded sequence
    eos = 2   <eos>   last token; decoding stops there. Kept even when a text is truncated
    unk = 3   <unk>   reserved; byte-level BPE never produces it

Tokenizers are stored in the Hugging Face format (tokenizer.json + tokenizer_config.json), so
`transformers.AutoTokenizer.from_pretrained(dir)` loads them, and `load_tokenizer` accepts any
local Hugging Face tokenizer directory (for real data with an imported text encoder). Such
tokenizers may lack some special tokens; the fallbacks, applied by `SpecialIds.of`, are:

    bos: bos_token -> cls_token -> none (sequences start directly with the text)
    eos: eos_token -> sep_token -> none (sequences end with the text; truncation just cuts)
    pad: pad_token -> eos (if any) -> id 0
    unk: unk_token -> none

CLI (writes a Hugging Face tokenizer directory):

    python -m dalle3_jax.data.tokenizer train --out DIR [--n 50000 --vocab-size 1024]
    python -m dalle3_jax.data.tokenizer stats [--tokenizer DIR] [--n 2000]

The shipped default lives in `dalle3_jax/assets/tokenizer/` and was trained with the defaults
(50k captions, vocab_size=1024 requested). It has 1009 entries: training stops when no pair of
tokens occurs twice, i.e. every word of the world's language is already one token. Token
lengths (bos and eos included; all 10k finetune examples, seed 0): descriptive mean 45.4, p99 69,
max 76; short 5; alt mean 4.6, max 10. So max_text_len=80 holds every descriptive caption
seen (max 76 over 20k train and 5k eval examples too), and 16 every short or alt caption.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
from typing import Any, Iterable, Iterator, Sequence

import numpy as np

PAD, BOS, EOS, UNK = "<pad>", "<bos>", "<eos>", "<unk>"
SPECIAL_TOKENS = (PAD, BOS, EOS, UNK)  # their position in this tuple is their id
PAD_ID, BOS_ID, EOS_ID, UNK_ID = 0, 1, 2, 3

PACKAGED_TOKENIZER_DIR = os.path.join(os.path.dirname(os.path.dirname(__file__)), "assets", "tokenizer")

# Texts longer than this many characters per requested token are cut before encoding. Only the
# first max_len tokens are kept anyway, and tokens of this vocabulary are far shorter than 64
# characters, so the cut changes nothing unless a single "word" is thousands of characters
# long; it bounds the cost of a pathological 1 MB alt-text in the input pipeline.
_CHARS_PER_TOKEN_LIMIT = 64


# ----------------------------------------------------------------------------------------------
# Training


def world_captions(n: int, *, seed: int = 0, splits: Sequence[str] = ("train", "finetune")) -> Iterator[str]:
    """Yields up to `n` captions (descriptive, short and alt) of world examples, split by split.

    The count is shared evenly by the splits; each example contributes its three captions.
    """
    from dalle3_jax.data.world import WorldConfig, WorldSource  # the world is only needed here

    per_split = -(-n // len(splits))
    emitted = 0
    for split in splits:
        source = WorldSource(split, WorldConfig(seed=seed))
        taken = 0
        for i in range(len(source)):
            for text in _example_captions(source, i):
                if taken >= per_split or emitted >= n:
                    break
                taken += 1
                emitted += 1
                yield text
            if taken >= per_split or emitted >= n:
                break


def _example_captions(source: Any, i: int) -> list[str]:
    caps = source[i]["captions"]
    return [caps[k] for k in ("descriptive", "short", "alt") if caps.get(k)]


def train_tokenizer(texts: Iterable[str], vocab_size: int = 1024, out_dir: str | None = None):
    """Trains the byte-level BPE on `texts` and returns the `tokenizers.Tokenizer`.

    If `out_dir` is given, the tokenizer is also saved there in the Hugging Face format.
    """
    from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, processors, trainers

    tok = Tokenizer(models.BPE(unk_token=UNK))
    # NFC so that the same visible text always has the same bytes.
    tok.normalizer = normalizers.NFC()
    # A prefix space makes a word's tokens the same at the start of a caption as in its middle
    # ("square" alone, as in a bare-noun alt-text, and "... a red square"); the Strip decoder
    # removes that space again so decode(encode(text)) == text.
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True, use_regex=True)
    tok.decoder = decoders.Sequence([decoders.ByteLevel(), decoders.Strip(" ", 1, 0)])
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=2,
        special_tokens=list(SPECIAL_TOKENS),
        # All 256 bytes are in the vocabulary from the start: no text ever needs <unk>.
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer=trainer)
    for i, name in enumerate(SPECIAL_TOKENS):
        if tok.token_to_id(name) != i:
            raise RuntimeError(f"special token {name} got id {tok.token_to_id(name)}, expected {i}")
    # HF-style calls (tokenizer(text)) add <bos>/<eos> like encode_batch does.
    tok.post_processor = processors.TemplateProcessing(
        single=f"{BOS} $A {EOS}", pair=f"{BOS} $A {EOS} $B {EOS}",
        special_tokens=[(BOS, BOS_ID), (EOS, EOS_ID)],
    )
    if out_dir is not None:
        save_hf_tokenizer(tok, out_dir)
    return tok


def save_hf_tokenizer(tok, out_dir: str) -> None:
    """Writes `tok` as a directory that transformers.AutoTokenizer can load."""
    os.makedirs(out_dir, exist_ok=True)
    tok.save(os.path.join(out_dir, "tokenizer.json"))
    special = {"pad_token": PAD, "bos_token": BOS, "eos_token": EOS, "unk_token": UNK}
    config = {
        "tokenizer_class": "PreTrainedTokenizerFast",
        # No length limit of its own: callers choose max_len per model.
        "model_max_length": 1_000_000,
        # HF's clean-up rewrites " ," and " 's"; captions must round-trip unchanged.
        "clean_up_tokenization_spaces": False,
        **special,
    }
    with open(os.path.join(out_dir, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    with open(os.path.join(out_dir, "special_tokens_map.json"), "w") as f:
        json.dump(special, f, indent=2)


# ----------------------------------------------------------------------------------------------
# Loading


def load_tokenizer(path: str | None = None):
    """Loads a Hugging Face tokenizer (a PreTrainedTokenizerFast) from a local directory.

    Args:
      path: a directory with tokenizer.json (or any files AutoTokenizer understands), or a
        file path to a tokenizer.json. None loads the packaged shapes-world tokenizer.

    Raises:
      FileNotFoundError: if the directory does not exist or holds no tokenizer.
    """
    path = PACKAGED_TOKENIZER_DIR if path is None else os.path.expanduser(str(path))
    if os.path.isfile(path) and path.endswith(".json"):
        from transformers import PreTrainedTokenizerFast

        return PreTrainedTokenizerFast(tokenizer_file=path)
    if not os.path.isdir(path):
        raise FileNotFoundError(f"tokenizer directory {path!r} does not exist")
    known = ("tokenizer.json", "tokenizer_config.json", "vocab.json", "vocab.txt", "spiece.model", "tokenizer.model")
    if not any(os.path.exists(os.path.join(path, name)) for name in known):
        raise FileNotFoundError(
            f"{path!r} holds no tokenizer: expected one of {', '.join(known)} "
            "(train one with `python -m dalle3_jax.data.tokenizer train --out DIR`)"
        )
    from transformers import AutoTokenizer

    try:
        return AutoTokenizer.from_pretrained(path)
    except (OSError, ValueError) as e:
        raise FileNotFoundError(f"could not load a tokenizer from {path!r}: {e}") from e


@dataclasses.dataclass(frozen=True)
class SpecialIds:
    """The special ids one tokenizer uses, after the documented fallbacks (None = absent)."""

    pad: int
    bos: int | None
    eos: int | None
    unk: int | None

    @classmethod
    def of(cls, tok) -> "SpecialIds":
        def first(*names):
            for name in names:
                value = getattr(tok, name, None)
                if value is not None:
                    return int(value)
            return None

        bos = first("bos_token_id", "cls_token_id")
        eos = first("eos_token_id", "sep_token_id")
        pad = first("pad_token_id")
        if pad is None:
            pad = eos if eos is not None else 0
        return cls(pad=pad, bos=bos, eos=eos, unk=first("unk_token_id"))


class Tokenize:
    """Fixed-length batch encoding and decoding with one tokenizer.

    Holds the fast Rust tokenizer and the special ids only, so it is cheap to pickle into
    Grain worker processes and encodes a whole batch in one call.
    """

    def __init__(self, tok):
        if isinstance(tok, Tokenize):
            tok = tok.hf
        self.hf = tok
        self.ids = SpecialIds.of(tok)
        # The Rust tokenizer, if this is a fast tokenizer; encodes without the HF call overhead.
        self._backend = getattr(tok, "backend_tokenizer", None)
        self.vocab_size = len(tok)

    def _encode_texts(self, texts: list[str]) -> list[list[int]]:
        if self._backend is not None:
            return [e.ids for e in self._backend.encode_batch(texts, add_special_tokens=False)]
        return self.hf(texts, add_special_tokens=False)["input_ids"]

    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        """Encodes texts as `bos text eos`, truncated and padded to exactly `max_len` tokens.

        Truncation drops text tokens from the end but keeps eos, so every sequence is complete.

        Returns:
          tokens: int32 [B, max_len], padded with the pad id.
          lengths: int32 [B], the number of non-pad tokens (bos and eos included).
        """
        n_special = (self.ids.bos is not None) + (self.ids.eos is not None)
        if max_len < n_special + 1:
            raise ValueError(f"max_len={max_len} leaves no room for text between the special tokens")
        room = max_len - n_special
        char_limit = max_len * _CHARS_PER_TOKEN_LIMIT
        clean = [("" if t is None else str(t))[:char_limit] for t in texts]
        tokens = np.full((len(clean), max_len), self.ids.pad, dtype=np.int32)
        lengths = np.zeros((len(clean),), dtype=np.int32)
        for row, ids in enumerate(self._encode_texts(clean) if clean else []):
            seq = ids[:room]
            if self.ids.bos is not None:
                seq = [self.ids.bos] + seq
            if self.ids.eos is not None:
                seq = seq + [self.ids.eos]
            tokens[row, : len(seq)] = seq
            lengths[row] = len(seq)
        return tokens, lengths

    def decode(self, ids) -> str | list[str]:
        """Decodes one sequence (1-D) or a batch (2-D): stops at eos, drops special tokens."""
        arr = np.asarray(ids)
        if arr.ndim == 2:
            return [self.decode(row) for row in arr]
        seq = [int(i) for i in arr.reshape(-1)]
        if self.ids.eos is not None and self.ids.eos in seq:
            # The first eos ends the text; anything a sampler wrote after it is not part of it.
            seq = seq[: seq.index(self.ids.eos)]
        if self.ids.bos is not None and seq and seq[0] == self.ids.bos:
            seq = seq[1:]
        return self.hf.decode(seq, skip_special_tokens=True, clean_up_tokenization_spaces=False)


def _as_tokenize(tok) -> Tokenize:
    if isinstance(tok, Tokenize):
        return tok
    cached = getattr(tok, "_dalle3_jax_tokenize", None)
    if cached is None:
        cached = Tokenize(tok)
        try:  # cache on the tokenizer object: SpecialIds lookups are slow HF properties
            tok._dalle3_jax_tokenize = cached
        except AttributeError:
            pass
    return cached


def encode_batch(tok, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
    """`Tokenize(tok).encode_batch(texts, max_len)`: int32 tokens [B, max_len] and lengths [B]."""
    return _as_tokenize(tok).encode_batch(texts, max_len)


def decode(tok, ids) -> str | list[str]:
    """`Tokenize(tok).decode(ids)`: text up to the first eos, special tokens skipped."""
    return _as_tokenize(tok).decode(ids)


# ----------------------------------------------------------------------------------------------
# Statistics and CLI


def caption_length_stats(tok, texts: Sequence[str]) -> dict[str, float]:
    """Token lengths of `texts` including bos and eos (what max_len must hold)."""
    t = _as_tokenize(tok)
    lengths = np.array([len(ids) for ids in t._encode_texts(list(texts))], dtype=np.int64)
    lengths += (t.ids.bos is not None) + (t.ids.eos is not None)
    return {
        "n": int(lengths.size),
        "mean": float(lengths.mean()),
        "p50": float(np.percentile(lengths, 50)),
        "p99": float(np.percentile(lengths, 99)),
        "max": int(lengths.max()),
    }


def _stats_report(tok, n: int, seed: int) -> dict[str, Any]:
    from dalle3_jax.data.world import WorldConfig, WorldSource

    source = WorldSource("finetune", WorldConfig(seed=seed))
    per_kind: dict[str, list[str]] = {"descriptive": [], "short": [], "alt": []}
    for i in range(min(n, len(source))):
        caps = source[i]["captions"]
        for kind in per_kind:
            per_kind[kind].append(caps[kind])
    return {
        "vocab_size": len(tok),
        **{kind: caption_length_stats(tok, texts) for kind, texts in per_kind.items()},
    }


def main(argv: Sequence[str] | None = None) -> int:
    parser = argparse.ArgumentParser(prog="python -m dalle3_jax.data.tokenizer", description=__doc__.split("\n")[0])
    sub = parser.add_subparsers(dest="command", required=True)
    p_train = sub.add_parser("train", help="train a tokenizer on world captions")
    p_train.add_argument("--out", required=True, help="output directory (Hugging Face format)")
    p_train.add_argument("--n", type=int, default=50_000, help="number of captions to train on")
    p_train.add_argument("--vocab-size", type=int, default=1024)
    p_train.add_argument("--seed", type=int, default=0, help="world seed")
    p_train.add_argument("--stats-n", type=int, default=2000, help="finetune examples for the length report")
    p_stats = sub.add_parser("stats", help="caption token-length statistics")
    p_stats.add_argument("--tokenizer", default=None, help="tokenizer directory (default: packaged)")
    p_stats.add_argument("--n", type=int, default=2000, help="number of finetune examples")
    p_stats.add_argument("--seed", type=int, default=0)
    args = parser.parse_args(argv)

    if args.command == "train":
        train_tokenizer(world_captions(args.n, seed=args.seed), vocab_size=args.vocab_size, out_dir=args.out)
        tok = load_tokenizer(args.out)
        report = {"out": args.out, "n_captions": args.n, **_stats_report(tok, args.stats_n, args.seed)}
    else:
        report = _stats_report(load_tokenizer(args.tokenizer), args.n, args.seed)
    json.dump(report, sys.stdout, indent=2)
    sys.stdout.write("\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
