"""Data presets: the `data=` variant shared by the captioner, recaption and T2I configs.

    configs/captioner_pretrain.py:data=prepared:data/laion_prepared
    configs/captioner_descriptive.py:data=tfds:coco_captions,model=S
    configs/recaption.py:data=prepared:data/laion_prepared
    configs/t2i.py:data=prepared:data/laion_prepared,caption=alt

Presets:
  world          the built-in synthetic world (the default; the configs' own settings)
  prepared:DIR   ArrayRecord shards written by launch/prepare.py --output DIR (img2dataset tars
                 or parquet). DIR may hold "{split}": prepared:data/coco/{split} trains on
                 data/coco/train and evaluates on data/coco/eval (prepare each split into its
                 own folder). Without it, the evals read the first records of the training
                 shards: the validation loss is then not held out.
  tfds:NAME      a TFDS dataset prepared in array_record format (tfds build NAME
                 --file_format=array_record), read with tfds.data_source: no TensorFlow at run
                 time. Its folder is TFDS's default data_dir unless --config.data.tfds_data_dir
                 says otherwise. For coco_captions (COCO 2014, Karpathy splits) the fields are
                 set as COCO has them: image `image`, captions `captions/text` (the first of
                 each image's five), ids `image/id`; training reads `train+restval` (113k
                 images) and evals read `val` (5k). Another NAME uses `image`, `captions/text`,
                 `train` and `validation`; change them with --config.data.tfds_* flags.

What a real-data preset changes besides the source (`apply`):
  captioner  model and input image size 224 (a ViT-S/B/L input; `image_size=N` overrides),
             captions up to 64 tokens, evals on the held-out split against the training
             caption field. The captioner's fact precision / recall need the world's scenes,
             so on real data its evals report the validation loss and retrieval recall@1 only.
  recaption  the job's input; every record keeps its caption as `alt`.
  t2i        64 px in pixel space, 256 px with an autoencoder (32 x 32 latents through a
             Stable Diffusion VAE), `image_size=N` overrides; captions up to 80 tokens; the
             validation loss and sample grid read the training source (eval.source = "data")
             with the training caption; prompt following, which parses images with the
             world's scene parser, is off (eval.n_prompts = 0): score real-data samples with an
             imported CLIP instead (evals/clip_score.py ClipScorer.from_pretrained).
             caption=descriptive_gt (the world's oracle) is an error.

Caption names: prepared shards carry the caption name given to launch/prepare.py
(--caption_name, default `alt`), and each captioner config reads its own (`alt` for
pretraining, `short` and `descriptive` for fine-tuning): prepare a labelled set with
--caption_name descriptive, or point the config elsewhere with --config.input.caption_field.
A TFDS dataset gives its caption under whichever name the config reads.

The packaged tokenizer was trained on the world's captions; it encodes any text (byte-level
BPE), but real captions are better served by a real vocabulary: --config.tokenizer=DIR (any
local Hugging Face tokenizer directory) with --config.model.vocab_size >= its size.
"""

from __future__ import annotations

import dataclasses
import glob
import os

import ml_collections

KINDS = ("world", "prepared", "tfds")
ROLES = ("captioner", "recaption", "t2i")


@dataclasses.dataclass(frozen=True)
class TfdsLayout:
    """Where a TFDS dataset keeps what the recipe reads (feature paths, split names)."""

    image_key: str = "image"
    caption_key: str = "captions/text"
    id_key: str = ""
    train_split: str = "train"
    eval_split: str = "validation"


# Datasets whose layout is known (read from their TFDS builders' feature specs).
TFDS_LAYOUTS = {
    # tensorflow_datasets/object_detection/coco_captions.py: COCO 2014 with Karpathy & Li's
    # splits train (83k), restval (30k), val (5k), test (5k); captions Sequence({text, id}).
    "coco_captions": TfdsLayout(image_key="image", caption_key="captions/text", id_key="image/id",
                                train_split="train+restval", eval_split="val"),
}

# Default sizes on real data (see the module docstring); `image_size=N` overrides them.
CAPTIONER_IMAGE_SIZE = 224
T2I_IMAGE_SIZE = 64
T2I_LATENT_IMAGE_SIZE = 256
CAPTIONER_MAX_TEXT_LEN = 64
T2I_MAX_TEXT_LEN = 80


@dataclasses.dataclass(frozen=True)
class DataPreset:
    """A parsed `data=` value: kind "world", "prepared" (path) or "tfds" (name)."""

    kind: str
    path: str = ""
    name: str = ""

    @property
    def real(self) -> bool:
        return self.kind != "world"

    @property
    def layout(self) -> TfdsLayout:
        return TFDS_LAYOUTS.get(self.name.split("/")[0], TfdsLayout())

    @property
    def eval_split(self) -> str:
        return self.layout.eval_split if self.kind == "tfds" else "eval"


def parse(spec: str | DataPreset) -> DataPreset:
    """`world` | `prepared:DIR` | `tfds:NAME` -> DataPreset.

    Raises ValueError for an unknown or empty preset, FileNotFoundError for a `prepared:` folder
    that does not exist or holds no shards.
    """
    if isinstance(spec, DataPreset):
        return spec
    kind, sep, value = (spec or "world").partition(":")
    if kind == "world" and not sep:
        return DataPreset("world")
    if kind == "prepared" and value:
        train_dir = value.replace("{split}", "train")
        if not os.path.isdir(train_dir):
            raise FileNotFoundError(f"data=prepared:{value}: no folder {train_dir!r} (write one with "
                                    f"python launch/prepare.py --input ... --output {train_dir})")
        if not glob.glob(os.path.join(train_dir, "*.array_record")):
            raise FileNotFoundError(f"data=prepared:{value}: {train_dir!r} holds no *.array_record shards; "
                                    "is it the --output folder of launch/prepare.py?")
        return DataPreset("prepared", path=value)
    if kind == "tfds" and value:
        return DataPreset("tfds", name=value)
    raise ValueError(f"unknown data preset {spec!r}; valid: world, prepared:DIR, tfds:NAME "
                     "(e.g. data=tfds:coco_captions)")


def _set_source(c: ml_collections.ConfigDict, preset: DataPreset, caption_names: list[str]) -> None:
    """Points c.data at the preset's training records, giving captions under `caption_names`."""
    c.data.split = "train"
    if preset.kind == "prepared":
        c.data.source = "arrayrecord"
        c.data.arrayrecord_pattern = preset.path
        return
    layout = preset.layout
    c.data.source = "tfds"
    c.data.tfds_name = preset.name
    c.data.tfds_split = layout.train_split
    c.data.tfds_image_key = layout.image_key
    c.data.tfds_caption_keys = ml_collections.ConfigDict({n: layout.caption_key for n in caption_names})
    c.data.tfds_id_key = layout.id_key


def apply(c: ml_collections.ConfigDict, spec: str | DataPreset, *, role: str, image_size: int = 0,
          latent: bool = False) -> DataPreset:
    """Fits config `c` of stage `role` (captioner | recaption | t2i) to data preset `spec`, in
    place; the world preset changes nothing. `image_size` (0 = the preset's default) and, for
    T2I, `latent` (an autoencoder is configured) choose the image size. Returns the preset."""
    if role not in ROLES:
        raise ValueError(f"role={role!r}; valid: {', '.join(ROLES)}")
    preset = parse(spec)
    if not preset.real:
        return preset
    if role == "recaption":
        _set_source(c, preset, ["alt"])  # the original caption travels on as the records' alt text
        return preset
    if role == "captioner":
        c.eval.caption_field = c.input.caption_field  # real data has one kind of caption
        _set_source(c, preset, [c.input.caption_field])
        c.eval.split = preset.eval_split
        size = image_size or CAPTIONER_IMAGE_SIZE
        c.model.image_size = c.input.image_size = size
        c.input.max_text_len = min(CAPTIONER_MAX_TEXT_LEN, c.model.max_text_len)
        return preset
    if c.caption == "descriptive_gt":
        raise ValueError("caption=descriptive_gt trains on the synthetic world's true descriptions; on "
                         f"data={spec} use caption=alt (the dataset's captions) or caption=ssc|dsc with "
                         "records=DIR (the recaption job's output)")
    if c.caption == "alt":
        _set_source(c, preset, ["alt"])
        c.eval.split = preset.eval_split
    else:  # ssc | dsc: the training records are the recaption job's output (records=DIR)
        c.eval.split = "eval"  # read only where that folder's pattern holds "{split}"
    c.eval.source = "data"  # the training source: the world's eval split means nothing here
    c.eval.caption_field = c.caption  # validation and the sample grid use the trained caption
    c.eval.n_prompts = 0  # prompt following parses images with the world's scene parser
    size = image_size or (T2I_LATENT_IMAGE_SIZE if latent else T2I_IMAGE_SIZE)
    c.input.image_size = c.model.unet.image_size = size
    c.input.max_text_len = T2I_MAX_TEXT_LEN
    return preset
