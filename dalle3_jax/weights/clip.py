"""Pretrained CLIP from a Hugging Face checkpoint directory into `dalle3_jax.models.clip`.

    from dalle3_jax.weights import clip as clip_weights
    model, info = clip_weights.load_clip("/data/clip-vit-base-patch32")
    emb = model.encode_images(model.normalize_images(images01))        # HF get_image_features
    tok = clip_weights.ClipTokenizer.from_pretrained("/data/clip-vit-base-patch32")
    tokens, _ = tok.encode_batch(["a photo of a cat"], model.config.max_text_len)
    txt = model.encode_texts(tokens)                                    # HF get_text_features

Read: config.json (CLIPModel, or a one-tower CLIPVisionModel[WithProjection] /
CLIPTextModel[WithProjection] config), the safetensors weights (single file or sharded index;
never a pickle) and, when present, preprocessor_config.json (image mean, std and size).
Checkpoints saved by transformers 4 (`vision_model.` prefixes everywhere) and 5 (bare
`embeddings.`, `encoder.` keys in one-tower models) are both understood: the tower prefixes are
found from the keys.

CoCa's image encoder (`models/vit.py`) can start from a CLIP vision tower: `init_coca_vision`
loads the patch embedding, the patch position embeddings (resized when the grid differs) and the
transformer blocks where shapes match, and lists everything that cannot be mapped in one error.
The captioner trainer uses it when `config.init.clip_vision` names a directory.
"""

from __future__ import annotations

import logging
import math
import os
from collections.abc import Mapping, Sequence
from typing import Any

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from dalle3_jax import sharding
from dalle3_jax.models import clip as clip_model
from dalle3_jax.weights import safetensors_io as sio

log = logging.getLogger(__name__)

# transformers' CLIPTextConfig / CLIPVisionConfig defaults (v5), for fields a config.json omits.
_TEXT_DEFAULTS = dict(vocab_size=49408, hidden_size=512, intermediate_size=2048, num_hidden_layers=12,
                      num_attention_heads=8, max_position_embeddings=77, hidden_act="quick_gelu",
                      layer_norm_eps=1e-5, eos_token_id=49407, bos_token_id=49406, pad_token_id=1)
_VISION_DEFAULTS = dict(hidden_size=768, intermediate_size=3072, num_hidden_layers=12, num_attention_heads=12,
                        num_channels=3, image_size=224, patch_size=32, hidden_act="quick_gelu", layer_norm_eps=1e-5)
# Buffers some checkpoints carry and the model recomputes.
IGNORED_KEYS = ("*position_ids",)

_PATCH_KEY = "embeddings.patch_embedding.weight"
_TOKEN_KEY = "embeddings.token_embedding.weight"


# ----------------------------------------------------------------------------------------------
# Config
# ----------------------------------------------------------------------------------------------


def _find_prefix(keys, suffix: str) -> str | None:
    hits = sorted(k[: -len(suffix)] for k in keys if k.endswith(suffix))
    if len(hits) > 1:
        raise sio.CheckpointError(f"several towers end in {suffix!r}: {hits}")
    return hits[0] if hits else None


def _outer(prefix: str, tower: str) -> str:
    """'clip.vision_model.' -> 'clip.' (where the projections and logit_scale live)."""
    return prefix[: -len(tower)] if prefix.endswith(tower) else ""


def layout(keys) -> dict[str, str | None]:
    """Where each part lives in a checkpoint's keys: the vision / text tower prefixes (None when
    absent) and the keys of the two projections and the logit scale (None when absent)."""
    keys = list(keys)
    v, t = _find_prefix(keys, _PATCH_KEY), _find_prefix(keys, _TOKEN_KEY)
    outer = _outer(v, "vision_model.") if v is not None else _outer(t, "text_model.") if t is not None else ""
    have = set(keys)
    get = lambda k: outer + k if outer + k in have else None  # noqa: E731
    return {"vision": v, "text": t, "visual_projection": get("visual_projection.weight"),
            "text_projection": get("text_projection.weight"), "logit_scale": get("logit_scale")}


def _act(name: str, where: str) -> str:
    if name not in clip_model.ACTIVATIONS:
        raise sio.CheckpointError(f"{where}.hidden_act={name!r} is not supported; expected one of "
                                  f"{clip_model.ACTIVATIONS}")
    return name


def hf_config_to_ours(hf: Mapping[str, Any], keys: Sequence[str], preprocessor: Mapping[str, Any] | None = None,
                      *, dtype: str = "float32", param_dtype: str = "float32") -> ml_collections.ConfigDict:
    """Our CLIP config (models/clip.py) from an HF config.json dict, the checkpoint's tensor
    names (which towers and projections it has) and its preprocessor_config.json, if any."""
    kind = hf.get("model_type", "")
    if kind == "clip":
        vis, txt = dict(hf.get("vision_config") or {}), dict(hf.get("text_config") or {})
    elif kind == "clip_vision_model":
        vis, txt = dict(hf), {}
    elif kind == "clip_text_model":
        vis, txt = {}, dict(hf)
    else:
        raise sio.CheckpointError(f"config.json has model_type={kind!r}; expected a CLIP checkpoint "
                                  f"('clip', 'clip_vision_model' or 'clip_text_model')")
    where = layout(keys)
    if where["vision"] is None and where["text"] is None:
        raise sio.CheckpointError(f"no CLIP tower in the checkpoint: no key ends in {_PATCH_KEY!r} or {_TOKEN_KEY!r}")
    towers = "both" if where["vision"] is not None and where["text"] is not None else \
        "vision" if where["vision"] is not None else "text"
    projection = (where["visual_projection"] is not None) if towers != "text" else (where["text_projection"] is not None)
    if towers == "both" and (where["visual_projection"] is None or where["text_projection"] is None):
        raise sio.CheckpointError("a two-tower CLIP checkpoint needs visual_projection.weight and "
                                  "text_projection.weight")
    v = {**_VISION_DEFAULTS, **vis}
    t = {**_TEXT_DEFAULTS, **txt}
    over: dict[str, Any] = dict(towers=towers, projection=projection, dtype=dtype, param_dtype=param_dtype)
    if towers in ("both", "vision"):
        over.update(image_size=int(v["image_size"]), patch_size=int(v["patch_size"]), channels=int(v["num_channels"]),
                    vision_width=int(v["hidden_size"]), vision_layers=int(v["num_hidden_layers"]),
                    vision_heads=int(v["num_attention_heads"]), vision_mlp_dim=int(v["intermediate_size"]),
                    vision_act=_act(v["hidden_act"], "vision_config"), vision_eps=float(v["layer_norm_eps"]))
    if towers in ("both", "text"):
        eos = t.get("eos_token_id")
        over.update(vocab_size=int(t["vocab_size"]), max_text_len=int(t["max_position_embeddings"]),
                    text_width=int(t["hidden_size"]), text_layers=int(t["num_hidden_layers"]),
                    text_heads=int(t["num_attention_heads"]), text_mlp_dim=int(t["intermediate_size"]),
                    text_act=_act(t["hidden_act"], "text_config"), text_eps=float(t["layer_norm_eps"]),
                    eos_id=int(eos if eos is not None else 49407),
                    bos_id=int(t["bos_token_id"]) if t.get("bos_token_id") is not None else 49406,
                    pad_id=int(t["pad_token_id"]) if t.get("pad_token_id") is not None else 1)
    if projection:
        over["embed_dim"] = int(hf.get("projection_dim", v.get("projection_dim", t.get("projection_dim", 512))))
    else:
        over["embed_dim"] = over.get("vision_width", over.get("text_width"))
    if "logit_scale_init_value" in hf:
        over["logit_scale_init"] = float(hf["logit_scale_init_value"])
    if preprocessor:
        if "image_mean" in preprocessor:
            over["image_mean"] = tuple(float(x) for x in preprocessor["image_mean"])
        if "image_std" in preprocessor:
            over["image_std"] = tuple(float(x) for x in preprocessor["image_std"])
    c = clip_model.config("tiny", **over)
    c.variant = "pretrained"
    return c


# ----------------------------------------------------------------------------------------------
# Mapping: our param path -> (HF key, transform)
# ----------------------------------------------------------------------------------------------


def _block_mapping(ours: str, hf: str, heads: int, mlp: tuple[str, str] = ("fc1", "fc2")) -> dict:
    a = f"{hf}self_attn."
    m = {
        f"{ours}.norm_attn.scale": (f"{hf}layer_norm1.weight", None),
        f"{ours}.norm_attn.bias": (f"{hf}layer_norm1.bias", None),
        f"{ours}.norm_mlp.scale": (f"{hf}layer_norm2.weight", None),
        f"{ours}.norm_mlp.bias": (f"{hf}layer_norm2.bias", None),
        f"{ours}.attn.out.kernel": (f"{a}out_proj.weight", sio.heads_to_linear(heads)),
        f"{ours}.attn.out.bias": (f"{a}out_proj.bias", None),
        f"{ours}.mlp.{mlp[0]}.kernel": (f"{hf}mlp.fc1.weight", sio.linear),
        f"{ours}.mlp.{mlp[0]}.bias": (f"{hf}mlp.fc1.bias", None),
        f"{ours}.mlp.{mlp[1]}.kernel": (f"{hf}mlp.fc2.weight", sio.linear),
        f"{ours}.mlp.{mlp[1]}.bias": (f"{hf}mlp.fc2.bias", None),
    }
    for name, proj in (("query", "q_proj"), ("key", "k_proj"), ("value", "v_proj")):
        m[f"{ours}.attn.{name}.kernel"] = (f"{a}{proj}.weight", sio.linear_to_heads(heads))
        m[f"{ours}.attn.{name}.bias"] = (f"{a}{proj}.bias", sio.bias_to_heads(heads))
    return m


def patch_kernel(w: np.ndarray) -> np.ndarray:
    """torch Conv2d [D, C, P, P] -> our patch matmul [P*P*C, D] (vit.patchify's (row, col, C) order)."""
    d = w.shape[0]
    return np.ascontiguousarray(np.asarray(w).transpose(2, 3, 1, 0).reshape(-1, d))


def clip_mapping(c: ml_collections.ConfigDict, where: Mapping[str, str | None]) -> dict:
    """The full mapping for our CLIP config `c` and a checkpoint `layout`."""
    m: dict[str, tuple] = {}
    if c.towers in ("both", "vision"):
        v = where["vision"]
        m["vision.patch_embed.kernel"] = (v + _PATCH_KEY, patch_kernel)
        m["vision.class_embed"] = (v + "embeddings.class_embedding", None)
        m["vision.pos"] = (v + "embeddings.position_embedding.weight", None)
        for ours, hf in (("pre_norm", "pre_layrnorm"), ("post_norm", "post_layernorm")):
            m[f"vision.{ours}.scale"] = (f"{v}{hf}.weight", None)
            m[f"vision.{ours}.bias"] = (f"{v}{hf}.bias", None)
        for i in range(c.vision_layers):
            m.update(_block_mapping(f"vision.blocks.{i}", f"{v}encoder.layers.{i}.", c.vision_heads))
        if c.projection:
            m["visual_proj.kernel"] = (where["visual_projection"], sio.linear)
    if c.towers in ("both", "text"):
        t = where["text"]
        m["text.token_embed"] = (t + _TOKEN_KEY, None)
        m["text.pos"] = (t + "embeddings.position_embedding.weight", None)
        m["text.final_norm.scale"] = (t + "final_layer_norm.weight", None)
        m["text.final_norm.bias"] = (t + "final_layer_norm.bias", None)
        for i in range(c.text_layers):
            m.update(_block_mapping(f"text.blocks.{i}", f"{t}encoder.layers.{i}.", c.text_heads))
        if c.projection:
            m["text_proj.kernel"] = (where["text_projection"], sio.linear)
    if c.towers == "both":
        if where["logit_scale"] is None:
            raise sio.CheckpointError("a two-tower CLIP checkpoint needs logit_scale")
        m["logit_scale"] = (where["logit_scale"], lambda x: np.asarray(x).reshape(()))
    return m


# ----------------------------------------------------------------------------------------------
# load_clip
# ----------------------------------------------------------------------------------------------


def _preprocessor(path: str | os.PathLike) -> dict[str, Any] | None:
    p = os.path.join(path, "preprocessor_config.json")
    return sio.load_config(path, "preprocessor_config.json") if os.path.isfile(p) else None


def load_clip(path: str | os.PathLike, *, dtype: str = "float32", param_dtype: str = "float32",
              mesh: jax.sharding.Mesh | None = None) -> tuple[clip_model.CLIP, dict[str, Any]]:
    """Imports the HF CLIP checkpoint directory `path`: (model, info).

    Every param is filled from the checkpoint (an error lists anything missing, mis-shaped or
    unused). The model is built abstractly and filled, so no random initialisation is computed;
    with `mesh` each weight is placed sharded by the logical-axis rules. info: hf_config,
    preprocessor (dict or None), layout (the tower prefixes), report (sio.LoadReport),
    architectures, path.
    """
    path = os.fspath(path)
    hf = sio.load_config(path)
    tensors = sio.open_tensors(path)
    pre = _preprocessor(path)
    cfg = hf_config_to_ours(hf, list(tensors), pre, dtype=dtype, param_dtype=param_dtype)
    where = layout(tensors)
    ctor = lambda: clip_model.create(cfg, rngs=nnx.Rngs(0))  # noqa: E731
    if mesh is not None:
        graphdef, abstract = sharding.abstract_state(ctor, mesh)
        model = nnx.merge(graphdef, abstract)
    else:
        model = nnx.eval_shape(ctor)
    report = sio.assign(model, clip_mapping(cfg, where), tensors, ignore=IGNORED_KEYS, what=f"CLIP checkpoint {path}")
    log.info("load_clip %s: %s", path, report.summary())
    info = {"path": path, "hf_config": hf, "preprocessor": pre, "layout": where, "report": report,
            "architectures": hf.get("architectures")}
    return model, info


# ----------------------------------------------------------------------------------------------
# Tokeniser and image preprocessing (for the evaluation CLIP)
# ----------------------------------------------------------------------------------------------


class ClipTokenizer:
    """The checkpoint's own tokenizer (tokenizer.json, read with the `tokenizers` library),
    encoding like HF's CLIPTokenizer(padding="max_length", truncation=True): start-of-text, the
    text (lower-cased and cleaned by the tokenizer's normaliser), end-of-text, then pad ids.

    `encode_batch(texts, max_len) -> (tokens int32 [B, max_len], lengths int32 [B])`, the
    interface of `data.tokenizer.Tokenize` that the evaluation CLIP uses."""

    def __init__(self, tokenizer: Any, pad_id: int, eos_id: int | None = None):
        self.tokenizer = tokenizer
        self.pad_id, self.eos_id = int(pad_id), eos_id
        self.vocab_size = tokenizer.get_vocab_size()

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, *, pad_id: int | None = None) -> ClipTokenizer:
        """The tokenizer of checkpoint directory `path` (tokenizer.json; the pad token from
        tokenizer_config.json / special_tokens_map.json, else the end-of-text token)."""
        from tokenizers import Tokenizer

        path = os.fspath(path)
        file = os.path.join(path, "tokenizer.json")
        if not os.path.isfile(file):
            raise sio.CheckpointError(
                f"{file} not found: the evaluation CLIP needs the checkpoint's fast tokenizer. Save one next to "
                f"the weights, e.g. `transformers.AutoTokenizer.from_pretrained(dir).save_pretrained(dir)`.")
        tok = Tokenizer.from_file(file)
        tok.no_padding()
        tok.no_truncation()
        eos = _special_id(tok, path, "eos_token", ("<|endoftext|>", "</s>"))
        if pad_id is None:
            pad_id = _special_id(tok, path, "pad_token", ())
        if pad_id is None:
            pad_id = eos if eos is not None else 0
        return cls(tok, pad_id, eos)

    def encode_batch(self, texts: Sequence[str], max_len: int) -> tuple[np.ndarray, np.ndarray]:
        tokens = np.full((len(texts), max_len), self.pad_id, np.int32)
        lengths = np.zeros((len(texts),), np.int32)
        encs = self.tokenizer.encode_batch([("" if t is None else str(t)) for t in texts]) if len(texts) else []
        for row, enc in enumerate(encs):
            ids = list(enc.ids)
            if len(ids) > max_len:
                # Keep the end-of-text token the text embedding is read at.
                ids = ids[: max_len - 1] + [ids[-1]]
            tokens[row, : len(ids)] = ids
            lengths[row] = len(ids)
        return tokens, lengths


def _special_id(tok: Any, path: str, field: str, fallbacks: Sequence[str]) -> int | None:
    import json

    names: list[str] = []
    for name in ("tokenizer_config.json", "special_tokens_map.json"):
        p = os.path.join(path, name)
        if os.path.isfile(p):
            with open(p) as f:
                value = json.load(f).get(field)
            if isinstance(value, dict):
                value = value.get("content")
            if isinstance(value, str):
                names.append(value)
    for name in (*names, *fallbacks):
        i = tok.token_to_id(name)
        if i is not None:
            return int(i)
    return None


def preprocess_images(images: np.ndarray, cfg: ml_collections.ConfigDict) -> np.ndarray:
    """uint8 [N, H, W, 3] (or float in [0, 1]) -> CLIP inputs [N, S, S, 3]: the centre square
    resized bicubic to S = cfg.image_size (CLIPImageProcessor's shortest-edge resize + centre
    crop), then per-channel mean/std normalisation with cfg.image_mean / cfg.image_std."""
    from dalle3_jax.evals import clip_score

    x = clip_score.to_model_images(images, int(cfg.image_size))  # [-1, 1], as the loader prepares images
    mean, std = np.asarray(cfg.image_mean, np.float32), np.asarray(cfg.image_std, np.float32)
    return ((x + 1.0) * 0.5 - mean) / std


# ----------------------------------------------------------------------------------------------
# CLIP vision tower -> CoCa's ViT
# ----------------------------------------------------------------------------------------------


def resize_positions(table: np.ndarray, grid: int) -> np.ndarray:
    """Patch position table [g*g, D] -> [grid*grid, D], bicubic over the 2-D grid."""
    n, d = table.shape
    g = int(round(math.sqrt(n)))
    if g * g != n:
        raise sio.CheckpointError(f"{n} patch positions do not form a square grid")
    if g == grid:
        return np.asarray(table)
    x = jnp.asarray(table, jnp.float32).reshape(g, g, d)
    return np.asarray(jax.image.resize(x, (grid, grid, d), "bicubic")).reshape(grid * grid, d)


def coca_vision_plan(vit_cfg: Mapping[str, Any], hf: Mapping[str, Any], keys: Sequence[str]
                     ) -> tuple[dict, list[str]]:
    """(mapping for CoCa's `vision` ViT, notes on what differs) from a CLIP checkpoint's config
    and keys. `vit_cfg`: the CoCa config (image_size, patch_size, vit_width, vit_depth,
    vit_heads, mlp_ratio, vit_pos, vit_stem, norm). CheckpointError lists every mismatch."""
    where = layout(keys)
    if where["vision"] is None:
        raise sio.CheckpointError("the checkpoint has no CLIP vision tower (no key ends in "
                                  f"{_PATCH_KEY!r}); CoCa's image encoder cannot start from it")
    kind = hf.get("model_type")
    v = {**_VISION_DEFAULTS, **((hf.get("vision_config") or {}) if kind == "clip" else hf)}
    c = vit_cfg
    problems: list[str] = []

    def need(ok: bool, what: str) -> None:
        if not ok:
            problems.append(what)

    width, depth, heads = int(v["hidden_size"]), int(v["num_hidden_layers"]), int(v["num_attention_heads"])
    need(int(c["vit_width"]) == width, f"width: CoCa vit_width={c['vit_width']}, CLIP hidden_size={width}")
    need(int(c["vit_depth"]) == depth, f"depth: CoCa vit_depth={c['vit_depth']}, CLIP num_hidden_layers={depth}")
    need(int(c["vit_heads"]) == heads, f"heads: CoCa vit_heads={c['vit_heads']}, CLIP num_attention_heads={heads}")
    mlp = int(c["mlp_ratio"]) * int(c["vit_width"])
    need(mlp == int(v["intermediate_size"]),
         f"MLP width: CoCa mlp_ratio*vit_width={mlp}, CLIP intermediate_size={v['intermediate_size']}")
    need(int(c["patch_size"]) == int(v["patch_size"]),
         f"patch size: CoCa patch_size={c['patch_size']}, CLIP patch_size={v['patch_size']}")
    need(not tuple(c.get("vit_stem", ()) or ()),
         f"conv stem: CoCa vit_stem={tuple(c['vit_stem'])} has no CLIP counterpart (set vit_stem=())")
    need(c.get("vit_pos", "learned") == "learned",
         f"positions: CoCa vit_pos={c['vit_pos']!r}; CLIP's are learned (set vit_pos='learned')")
    need(c.get("norm", "layernorm") == "layernorm", f"norm: CoCa norm={c['norm']!r}; CLIP uses layernorm")
    need(int(v["num_channels"]) == 3, f"channels: CLIP num_channels={v['num_channels']}, CoCa takes 3")
    if int(c["image_size"]) % int(c["patch_size"]):
        problems.append(f"image_size {c['image_size']} is not divisible by patch_size {c['patch_size']}")
    if problems:
        raise sio.CheckpointError("Cannot initialise CoCa's image encoder from this CLIP vision tower:\n  - "
                                  + "\n  - ".join(problems))

    p = where["vision"]
    grid = int(c["image_size"]) // int(c["patch_size"])
    clip_grid = int(v["image_size"]) // int(v["patch_size"])
    m: dict[str, tuple] = {
        "patch_embed.kernel": (p + _PATCH_KEY, patch_kernel),
        # CLIP's patch conv has no bias; CoCa's starts at zero.
        "patch_embed.bias": (p + _PATCH_KEY, lambda w: np.zeros((w.shape[0],), np.float32)),
        "pos": (p + "embeddings.position_embedding.weight", lambda t: resize_positions(np.asarray(t)[1:], grid)),
        "norm.scale": (p + "post_layernorm.weight", None),
        "norm.bias": (p + "post_layernorm.bias", None),
    }
    for i in range(depth):
        m.update(_block_mapping(f"blocks.{i}", f"{p}encoder.layers.{i}.", heads, mlp=("wi", "wo")))
    notes = [
        "CLIP's class token and its position are dropped (CoCa pools patch tokens with learned queries)",
        "CLIP's pre-layernorm (pre_layrnorm) has no CoCa counterpart and is dropped",
        "CoCa's final norm (applied to every token) starts from CLIP's post_layernorm (class token only)",
        f"MLP activation: CLIP {v['hidden_act']}, CoCa tanh-approximated gelu",
        f"layer-norm eps: CLIP {v['layer_norm_eps']}, CoCa 1e-6",
    ]
    if grid != clip_grid:
        notes.append(f"patch positions resized bicubic from a {clip_grid}x{clip_grid} to a {grid}x{grid} grid")
    return m, notes


def coca_vision_arrays(coca_cfg: Mapping[str, Any], path: str | os.PathLike) -> tuple[dict[str, np.ndarray], list[str]]:
    """The transformed arrays {our ViT param path: array} for CoCa config `coca_cfg` and the
    notes, read from CLIP checkpoint directory `path` (host side)."""
    hf, tensors = sio.load_config(path), sio.open_tensors(path)
    mapping, notes = coca_vision_plan(coca_cfg, hf, list(tensors))
    return {ours: (fn or (lambda x: x))(tensors[key]) for ours, (key, fn) in mapping.items()}, notes


def init_coca_vision(model: nnx.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Loads the CLIP vision tower of checkpoint `path` into `model.vision` (a CoCa's ViT).

    Works on a concrete model (values placed with each param's sharding) and inside a jitted
    initialiser such as `sharding.create_sharded` or `nnx.eval_shape` (the arrays then come in
    through one host callback, so they are not baked into the program as constants). Shapes are
    checked first; CheckpointError lists everything that cannot be mapped. Returns
    {"filled": [paths], "notes": [what differs from CLIP's math]}.
    """
    path = os.fspath(path)
    cfg = model.config
    hf = sio.load_config(path)
    keys = list(sio.open_tensors(path))
    mapping, notes = coca_vision_plan(cfg, hf, keys)
    state = nnx.state(model.vision, nnx.Param)
    flat = {sio.path_str(p): v for p, v in nnx.to_flat_state(state)}
    missing = sorted(set(flat) - set(mapping))
    if missing:
        raise sio.CheckpointError(f"CoCa ViT params with no CLIP counterpart: {missing}")
    values = [flat[k].get_value() for k in mapping]
    traced = any(isinstance(x, jax.core.Tracer) for x in values)
    if not traced:
        tensors = sio.open_tensors(path)
        sio.assign(state, mapping, tensors, allow_unused=True, what=f"CLIP checkpoint {path}")
        nnx.update(model.vision, state)
    else:
        names = list(mapping)
        shapes = [jax.ShapeDtypeStruct(np.shape(x), x.dtype) for x in values]

        def host() -> list[np.ndarray]:
            arrays, _ = coca_vision_arrays(cfg, path)
            out = []
            for name, s in zip(names, shapes):
                a = np.asarray(arrays[name])
                if a.shape != s.shape:
                    raise sio.CheckpointError(f"shape mismatch for CoCa param vision.{name}: expected {s.shape}, "
                                              f"got {a.shape} from {path}")
                out.append(a.astype(s.dtype))
            return out

        # Shapes checked at trace time, so a mismatch fails before anything runs.
        _check_traced_shapes(mapping, shapes, names, path, cfg)
        loaded = jax.pure_callback(host, shapes)
        # The callback's results live on one device; replicating them first lets the SPMD
        # partitioner slice each onto the param's sharding (instead of a warned-about fallback).
        replicate = (lambda x: jax.lax.with_sharding_constraint(x, jax.sharding.PartitionSpec())) \
            if not jax.sharding.get_abstract_mesh().empty else (lambda x: x)
        for name, value in zip(names, loaded):
            flat[name].set_value(replicate(value))
        nnx.update(model.vision, state)
    for note in notes:
        log.info("init CoCa vision from %s: %s", path, note)
    return {"filled": sorted(mapping), "notes": notes}


def _check_traced_shapes(mapping, shapes, names, path, cfg) -> None:
    tensors = sio.open_tensors(path)
    errors = []
    for name, s in zip(names, shapes):
        key, fn = mapping[name]
        src = tensors.shape(key)
        # Shape of the transform's output, computed on a zero array of the source shape (cheap
        # for everything but the position table, whose shape follows from the grid directly).
        if name == "pos":
            grid = int(cfg["image_size"]) // int(cfg["patch_size"])
            out = (grid * grid, src[1])
        else:
            out = tuple(np.shape((fn or (lambda x: x))(np.zeros(src, np.float32))))
        if out != tuple(s.shape):
            errors.append(f"shape mismatch for CoCa param vision.{name}: expected {tuple(s.shape)}, got {out} "
                          f"from CLIP key {key} {src}")
    if errors:
        raise sio.CheckpointError("Cannot initialise CoCa's image encoder:\n  - " + "\n  - ".join(errors))
