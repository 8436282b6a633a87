"""Pretrained CLIP import (dalle3_jax/weights/clip.py, safetensors_io.py, models/clip.py).

Small random `transformers` CLIP models on PyTorch CPU (no download) are saved with
`save_pretrained(safe_serialization=True)`, imported without PyTorch, and must reproduce HF's
outputs to <= 1e-4 in float32 on the same inputs.
"""

from __future__ import annotations

import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
import transformers
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.models import coca
from dalle3_jax.weights import clip as clip_weights
from dalle3_jax.weights import safetensors_io as sio

TOL = 1e-4
# The tiny CLIP tokenizer below: 512 byte-level symbols, 10 merges, then start/end of text.
BOS, EOS, VOCAB = 522, 523, 524


def _bytes_to_unicode() -> list[str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs, n = bs[:], 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return [chr(c) for c in cs]


def _save_tokenizer(directory: str) -> transformers.PreTrainedTokenizerBase:
    """A tiny byte-level BPE CLIPTokenizer, saved as tokenizer.json (+ tokenizer_config.json)."""
    chars = _bytes_to_unicode()
    merges = ["a t</w>", "c at</w>", "d o", "do g</w>", "t h", "th e</w>", "p h", "o t", "ph ot", "phot o</w>"]
    vocab = chars + [c + "</w>" for c in chars] + [m.replace(" ", "") for m in merges]
    vocab += ["<|startoftext|>", "<|endoftext|>"]
    assert len(vocab) == VOCAB
    src = os.path.join(directory, "_bpe")
    os.makedirs(src)
    with open(os.path.join(src, "vocab.json"), "w") as f:
        json.dump({t: i for i, t in enumerate(vocab)}, f)
    with open(os.path.join(src, "merges.txt"), "w") as f:
        f.write("#version: 0.2\n" + "\n".join(merges) + "\n")
    tok = transformers.CLIPTokenizer(os.path.join(src, "vocab.json"), os.path.join(src, "merges.txt"))
    tok.save_pretrained(directory)
    return tok


def _perturb(model: torch.nn.Module, seed: int) -> None:
    """Moves every weight off its init (norms at exactly 1/0, zero biases) so each one matters."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.05 * torch.randn(p.shape, generator=g))


def _clip_config(act: str = "quick_gelu", eos: int = EOS, layers: int = 2, **text):
    tc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=4, vocab_size=VOCAB,
              max_position_embeddings=16, hidden_act=act, eos_token_id=eos, bos_token_id=BOS, pad_token_id=EOS,
              layer_norm_eps=1e-5, **text)
    vc = dict(hidden_size=32, intermediate_size=64, num_hidden_layers=layers, num_attention_heads=2, image_size=32,
              patch_size=8, hidden_act=act, layer_norm_eps=1e-6)
    return transformers.CLIPConfig(text_config=tc, vision_config=vc, projection_dim=24, logit_scale_init_value=3.0)


def _save_clip(directory: str, act: str = "quick_gelu", eos: int = EOS, seed: int = 0,
               layers: int = 2) -> transformers.CLIPModel:
    torch.manual_seed(seed)
    model = transformers.CLIPModel(_clip_config(act, eos, layers)).eval()
    _perturb(model, seed)
    model.save_pretrained(directory, safe_serialization=True)
    return model


@pytest.fixture(scope="module")
def hf_clip(tmp_path_factory):
    """A random CLIPModel saved with its tokenizer and image processor: (directory, model, tokenizer)."""
    d = str(tmp_path_factory.mktemp("clip"))
    model = _save_clip(d)
    tok = _save_tokenizer(d)
    transformers.CLIPImageProcessor(size={"shortest_edge": 32}, crop_size={"height": 32, "width": 32},
                                    image_mean=[0.5, 0.4, 0.3], image_std=[0.2, 0.25, 0.3]).save_pretrained(d)
    return d, model, tok


def _inputs(seed: int = 0, eos: int = EOS):
    rng = np.random.default_rng(seed)
    pixels = rng.standard_normal((3, 32, 32, 3)).astype(np.float32)  # channels last (ours)
    ids = rng.integers(3, 500, size=(3, 16)).astype(np.int64)
    # end-of-text at different places; row 0 has a second one (the first counts), row 1 ends full
    for row, pos in enumerate((5, 15, 9)):
        ids[row, pos] = eos
    ids[0, 11] = eos
    return pixels, ids


def _hf_outputs(model, pixels, ids):
    with torch.no_grad():
        out = model(input_ids=torch.from_numpy(ids), pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        vision = model.vision_model(pixel_values=torch.from_numpy(pixels).permute(0, 3, 1, 2))
        image_features = model.visual_projection(vision.pooler_output)
        text_features = model.text_projection(model.text_model(input_ids=torch.from_numpy(ids)).pooler_output)
        scale = model.logit_scale.exp()
    return {k: np.asarray(v.numpy()) for k, v in dict(
        image_embed=out.image_embeds, text_embed=out.text_embeds, logits=out.logits_per_image,
        image_features=image_features, text_features=text_features, scale=scale,
        patches=vision.last_hidden_state[:, 1:]).items()}


def _max_diff(a, b) -> float:
    return float(np.max(np.abs(np.asarray(a, np.float32) - np.asarray(b, np.float32))))


@jax.jit
def _run_ours(model, pixels, ids):
    """Every output the parity tests compare, in one compiled call (eager dispatch of each op
    would cost more than the compilation)."""
    out = model(pixels, ids)
    return dict(out, image_features=model.encode_images(pixels), text_features=model.encode_texts(ids),
                patches=model.patch_tokens(pixels))


def _check_parity(directory: str, hf_model, eos: int = EOS) -> None:
    model, info = clip_weights.load_clip(directory)
    assert info["report"].unused_keys == [] and info["report"].unfilled == []
    pixels, ids = _inputs(eos=eos)
    ref = _hf_outputs(hf_model, pixels, ids)
    out = _run_ours(model, jnp.asarray(pixels), jnp.asarray(ids, jnp.int32))
    assert _max_diff(out["image_embed"], ref["image_embed"]) <= TOL
    assert _max_diff(out["text_embed"], ref["text_embed"]) <= TOL
    assert _max_diff(out["logit_scale"], ref["scale"]) <= TOL * float(ref["scale"])
    assert _max_diff(out["logits_per_image"], ref["logits"]) <= TOL * float(ref["scale"])
    # unnormalised features (HF get_*_features) and the patch tokens
    assert _max_diff(out["image_features"], ref["image_features"]) <= TOL
    assert _max_diff(out["text_features"], ref["text_features"]) <= TOL
    assert _max_diff(out["patches"], ref["patches"]) <= TOL


def test_clip_parity_quick_gelu(hf_clip):
    directory, hf_model, _ = hf_clip
    model, info = clip_weights.load_clip(directory)
    assert model.config.vision_act == model.config.text_act == "quick_gelu"
    assert model.config.vision_eps == 1e-6 and model.config.text_eps == 1e-5
    assert model.config.image_mean == (0.5, 0.4, 0.3)  # from preprocessor_config.json
    _check_parity(directory, hf_model)


def test_clip_parity_gelu_and_legacy_eos(tmp_path):
    """gelu (exact erf) towers, and eos_token_id == 2: HF's pre-#24773 rule pools at argmax(ids)."""
    hf_model = _save_clip(str(tmp_path), act="gelu", eos=2, seed=1, layers=1)
    model, _ = clip_weights.load_clip(str(tmp_path))
    assert model.config.vision_act == "gelu" and model.config.eos_id == 2
    _check_parity(str(tmp_path), hf_model, eos=VOCAB - 1)  # the highest id marks the end of text


def test_one_tower_checkpoints(tmp_path):
    cfg = _clip_config(layers=1)
    pixels, ids = _inputs()
    px = torch.from_numpy(pixels).permute(0, 3, 1, 2)
    for i, cls in enumerate([transformers.CLIPVisionModelWithProjection, transformers.CLIPVisionModel,
                             transformers.CLIPTextModelWithProjection, transformers.CLIPTextModel]):
        vision = "Vision" in cls.__name__
        sub = (cfg.vision_config if vision else cfg.text_config)
        sub.projection_dim = 24
        hf = cls(sub).eval()
        _perturb(hf, i)
        d = str(tmp_path / cls.__name__)
        hf.save_pretrained(d, safe_serialization=True)
        model, _ = clip_weights.load_clip(d)
        with torch.no_grad():
            out = hf(pixel_values=px) if vision else hf(input_ids=torch.from_numpy(ids))
        ref = getattr(out, "image_embeds" if vision else "text_embeds", None)
        ref = out.pooler_output if ref is None else ref
        ours = (jax.jit(lambda m, x: m.encode_images(x))(model, jnp.asarray(pixels)) if vision
                else jax.jit(lambda m, x: m.encode_texts(x))(model, jnp.asarray(ids, jnp.int32)))
        assert model.config.towers == ("vision" if vision else "text")
        assert _max_diff(ours, ref.numpy()) <= TOL, cls.__name__


def test_sharded_import_keeps_shardings(hf_clip):
    directory, hf_model, _ = hf_clip
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=2), devices=jax.devices()[:4])
    model, _ = clip_weights.load_clip(directory, mesh=mesh)
    kernel = model.vision.blocks[0].mlp.fc1.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", "tensor")
    # every weight but the scalar logit scale names its dimensions
    for path, var in nnx.to_flat_state(nnx.state(model, nnx.Param)):
        names = sharding.names_of(var)
        assert (names is not None and len(names) == var.get_value().ndim) or var.get_value().ndim == 0, path
    pixels, ids = _inputs()
    with jax.set_mesh(mesh):
        got = jax.jit(lambda m, x: m.encode_images(x, normalize=True))(model, jnp.asarray(pixels))
    assert _max_diff(got, _hf_outputs(hf_model, pixels, ids)["image_embed"]) <= TOL


def test_missing_and_misshaped_keys(hf_clip, tmp_path):
    from safetensors.numpy import load_file, save_file

    directory, _, _ = hf_clip
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    config = sio.load_config(directory)

    def write(name, mutate):
        d = tmp_path / name
        d.mkdir()
        t = dict(tensors)
        mutate(t)
        save_file(t, str(d / "model.safetensors"))
        (d / "config.json").write_text(json.dumps(config))
        return str(d)

    key = "vision_model.encoder.layers.1.mlp.fc1.weight"
    missing = write("missing", lambda t: t.pop(key))
    with pytest.raises(sio.CheckpointError, match=r"vision\.blocks\.1\.mlp\.fc1\.kernel.*" + key.replace(".", r"\.")):
        clip_weights.load_clip(missing)
    bad = write("misshaped", lambda t: t.__setitem__(key, np.zeros((64, 31), np.float32)))
    with pytest.raises(sio.CheckpointError, match=r"expected \(32, 64\), got \(31, 64\).*\(64, 31\)"):
        clip_weights.load_clip(bad)
    extra = write("extra", lambda t: t.__setitem__("some.other.weight", np.zeros(3, np.float32)))
    with pytest.raises(sio.CheckpointError, match="some.other.weight"):
        clip_weights.load_clip(extra)
    # directory and file errors
    with pytest.raises(sio.CheckpointError, match="does not exist"):
        clip_weights.load_clip(str(tmp_path / "nowhere"))
    pickled = tmp_path / "pickled"
    pickled.mkdir()
    (pickled / "config.json").write_text(json.dumps(config))
    (pickled / "pytorch_model.bin").write_bytes(b"not read")
    with pytest.raises(sio.CheckpointError, match="convert|Convert"):
        clip_weights.load_clip(str(pickled))


def test_sharded_index_and_bfloat16(hf_clip, tmp_path):
    """A sharded checkpoint (index + two files), one of them bfloat16, reads as the single file."""
    from safetensors.numpy import load_file
    from safetensors.torch import save_file as save_torch

    directory, _, _ = hf_clip
    tensors = load_file(os.path.join(directory, "model.safetensors"))
    keys = sorted(tensors)
    half = len(keys) // 2
    save_torch({k: torch.from_numpy(tensors[k]) for k in keys[:half]}, str(tmp_path / "a.safetensors"))
    save_torch({k: torch.from_numpy(tensors[k]).bfloat16() for k in keys[half:]}, str(tmp_path / "b.safetensors"))
    weight_map = {k: "a.safetensors" if i < half else "b.safetensors" for i, k in enumerate(keys)}
    (tmp_path / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    loaded = sio.load_tensors(str(tmp_path))
    assert sorted(loaded) == keys
    assert loaded[keys[-1]].dtype.name == "bfloat16"
    assert _max_diff(loaded[keys[-1]].astype(np.float32), tensors[keys[-1]]) < 0.02


def test_clip_scorer_from_pretrained(hf_clip, tmp_path, capsys):
    """The evaluation CLIP from an HF directory: its tokenizer, its image normalisation."""
    from dalle3_jax.evals import clip_score

    directory, hf_model, tok = hf_clip
    scorer = clip_score.ClipScorer.from_pretrained(directory, batch_size=8)
    texts = ["a photo of the cat", "The DOG", "x " * 40]  # the last one is truncated
    enc = tok(texts, padding="max_length", max_length=16, truncation=True, return_tensors="np")
    ours_tokens, _ = scorer.tokenize.encode_batch(texts, 16)
    np.testing.assert_array_equal(ours_tokens, enc["input_ids"])
    images = np.random.default_rng(0).integers(0, 256, size=(3, 32, 32, 3), dtype=np.uint8)
    pixels = transformers.CLIPImageProcessor.from_pretrained(directory)(list(images), return_tensors="pt")["pixel_values"]
    with torch.no_grad():
        out = hf_model(input_ids=torch.from_numpy(enc["input_ids"]), pixel_values=pixels)
    assert _max_diff(scorer.encode_texts(texts), out.text_embeds.numpy()) <= TOL
    assert _max_diff(scorer.encode_images(images), out.image_embeds.numpy()) <= TOL
    ref = 100 * np.clip(np.sum(out.image_embeds.numpy() * out.text_embeds.numpy(), 1), 0, None)
    assert _max_diff(scorer.score(images, texts), ref) <= 1e-2
    # the command line: judge figures of the imported CLIP on a few world scenes
    assert clip_score.main(["--clip_pretrained", directory, "--n", "4", "--json"]) == 0
    figures = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert figures["n_examples"] == 4 and 0 <= figures["short/clip_score"] <= 100
    # a directory without tokenizer.json is refused with a clear message
    bare = tmp_path / "bare"
    bare.mkdir()
    for name in ("config.json", "model.safetensors"):
        (bare / name).write_bytes(open(os.path.join(directory, name), "rb").read())
    with pytest.raises(sio.CheckpointError, match="tokenizer.json"):
        clip_score.ClipScorer.from_pretrained(str(bare))


def _coca_config(**over):
    base = dict(image_size=48, patch_size=8, vit_width=32, vit_depth=2, vit_heads=2, mlp_ratio=2, vit_stem=(),
                text_width=32, text_heads=2, unimodal_layers=1, multimodal_layers=1, n_caption_queries=4,
                pool_heads=2, embed_dim=16, vocab_size=64, max_text_len=8)
    return coca.config("tiny", **{**base, **over})


def test_coca_vision_init(hf_clip):
    """CLIP's patch embedding, positions (4x4 grid resized to CoCa's 6x6) and blocks go into
    CoCa's ViT: on a model outside jit, and inside a jitted, sharded initialiser such as the
    one the captioner trainer builds its model in (config.init.clip_vision)."""
    from dalle3_jax.trainers import captioner

    directory, hf_model, _ = hf_clip
    cfg = _coca_config()
    model = nnx.eval_shape(lambda: coca.create(cfg))  # only the vision params get values
    info = clip_weights.init_coca_vision(model, directory)
    assert any("pre-layernorm" in n for n in info["notes"]) and any("4x4 to a 6x6" in n for n in info["notes"])
    sd = {k: v.detach().numpy() for k, v in hf_model.state_dict().items()}
    vit = model.vision
    np.testing.assert_allclose(np.asarray(vit.patch_embed.kernel[...]),
                               sd["vision_model.embeddings.patch_embedding.weight"].transpose(2, 3, 1, 0).reshape(-1, 32))
    np.testing.assert_array_equal(np.asarray(vit.patch_embed.bias[...]), 0)
    np.testing.assert_allclose(np.asarray(vit.blocks[1].mlp.wi.kernel[...]),
                               sd["vision_model.encoder.layers.1.mlp.fc1.weight"].T)
    q = sd["vision_model.encoder.layers.0.self_attn.q_proj.weight"]
    np.testing.assert_allclose(np.asarray(vit.blocks[0].attn.query.kernel[...]), q.T.reshape(32, 2, 16))
    np.testing.assert_allclose(np.asarray(vit.norm.scale[...]), sd["vision_model.post_layernorm.weight"])
    pos = sd["vision_model.embeddings.position_embedding.weight"][1:]
    assert vit.pos.shape == (36, 32)
    # the 6x6 table is the 4x4 one resized: corners stay close to the original corners
    assert np.corrcoef(np.asarray(vit.pos[...])[0], pos[0])[0, 1] > 0.9
    same = nnx.eval_shape(lambda: coca.create(_coca_config(image_size=32)))
    clip_weights.init_coca_vision(same, directory)
    np.testing.assert_allclose(np.asarray(same.vision.pos[...]), pos)  # same grid: copied exactly

    # Inside jit (the arrays arrive through a host callback) with a sharded output: the
    # initialiser is zeros + the import, to keep the compilation small.
    mesh = sharding.make_mesh(dict(data=1, fsdp=2, tensor=1), devices=jax.devices()[:2])
    graphdef, abstract = sharding.abstract_state(lambda: coca.create(cfg), mesh)
    shardings = jax.tree.map(lambda a: a.sharding, abstract)

    def init():
        m = nnx.merge(graphdef, jax.tree.map(lambda a: jnp.zeros(a.shape, a.dtype), abstract))
        clip_weights.init_coca_vision(m, directory)
        return nnx.state(m)

    with jax.set_mesh(mesh):
        sharded = nnx.merge(graphdef, jax.jit(init, out_shardings=shardings)())
    kernel = sharded.vision.blocks[0].mlp.wi.kernel[...]
    assert kernel.sharding.spec == jax.sharding.PartitionSpec("fsdp", None)
    for a, b in zip(jax.tree.leaves(nnx.state(sharded.vision)), jax.tree.leaves(nnx.state(model.vision))):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-6)

    # The trainer's model: make_model(pretrained=True) imports config.init.clip_vision (traced
    # here, as in sharding.create_sharded); without pretrained (recaptioning, evaluation) the
    # directory is never read.
    config = captioner.default_config(smoke=True)
    config.model = cfg
    config.init.clip_vision = os.path.join(directory, "missing")
    with pytest.raises(sio.CheckpointError, match="does not exist"):
        nnx.eval_shape(lambda: captioner.make_model(config, pretrained=True))
    nnx.eval_shape(lambda: captioner.make_model(config))
    config.init.clip_vision = directory
    nnx.eval_shape(lambda: captioner.make_model(config, pretrained=True))
    config.model.vit_stem = (8,)
    with pytest.raises(sio.CheckpointError, match="vit_stem"):
        nnx.eval_shape(lambda: captioner.make_model(config, pretrained=True))


def test_coca_vision_init_errors(hf_clip):
    directory, _, _ = hf_clip
    model = nnx.eval_shape(lambda: coca.create(
        _coca_config(vit_width=64, vit_heads=4, vit_stem=(8,), patch_size=16, vit_pos="sincos")))
    with pytest.raises(sio.CheckpointError) as e:
        clip_weights.init_coca_vision(model, directory)
    msg = str(e.value)
    for part in ("vit_width=64", "hidden_size=32", "vit_heads=4", "patch_size=16", "vit_stem=(8,)", "vit_pos='sincos'"):
        assert part in msg, (part, msg)
