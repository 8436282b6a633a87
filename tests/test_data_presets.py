"""The `data=` variant (data/presets.py) of the captioner, recaption and T2I configs: each preset
gives a valid config; a captioner trains on launch/prepare.py shards made from an img2dataset
tar, with its evals on real data; a COCO-shaped TFDS dataset is read as coco_captions without
TensorFlow; clear errors for an unknown preset, a missing folder and the world-only oracle."""

import io
import json
import os
import tarfile

import numpy as np
import pytest
from PIL import Image

from dalle3_jax import configlib, trainers
from dalle3_jax.data import pipeline, presets, sources
from dalle3_jax.data import prepare as prepare_lib
from dalle3_jax.data import tokenizer as tokenizer_lib
from dalle3_jax.trainers import loop
from dalle3_jax.trainers import t2i as t2i_trainer

CONFIGS = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
CAPTIONERS = {"captioner_pretrain": "alt", "captioner_short": "short", "captioner_descriptive": "descriptive"}


def _config(name: str, variant: str):
    return configlib.load_config_file(os.path.join(CONFIGS, f"{name}.py:{variant}"))


def _jpeg(seed: int) -> bytes:
    buf = io.BytesIO()
    Image.fromarray(np.random.default_rng(seed).integers(0, 256, (40, 48, 3), dtype=np.uint8)).save(buf, "JPEG")
    return buf.getvalue()


def _img2dataset_tar(path: str, n: int, start: int = 0) -> None:
    """A WebDataset shard as img2dataset writes it: KEY.jpg, KEY.txt, KEY.json per sample."""
    with tarfile.open(path, "w") as tar:
        for i in range(start, start + n):
            key = f"{i:09d}"
            meta = {"url": f"http://example.com/{key}.jpg", "key": key, "caption": f"a photo of thing {i}"}
            for name, data in ((f"{key}.jpg", _jpeg(i)), (f"{key}.txt", f"a photo of thing {i}".encode()),
                               (f"{key}.json", json.dumps(meta).encode())):
                info = tarfile.TarInfo(name)
                info.size = len(data)
                tar.addfile(info, io.BytesIO(data))


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    """launch/prepare.py output for a 16-sample img2dataset tar (train) and an 8-sample one
    (eval), as root/train and root/eval: (root, path of the train folder)."""
    root = tmp_path_factory.mktemp("prepared")
    for split, n, start in (("train", 16, 0), ("eval", 8, 100)):
        tar = str(root / f"{split}.tar")
        _img2dataset_tar(tar, n, start)
        summary = prepare_lib.prepare([tar], str(root / split), records_per_shard=8, log=lambda m: None)
        assert summary["written"] == n, summary
    return str(root), str(root / "train")


def test_every_config_accepts_every_preset(prepared):
    root, train_dir = prepared
    for name, field in CAPTIONERS.items():
        world = _config(name, "tiny")
        assert world.data.source == "world" and world.eval.split == "eval"
        c = _config(name, f"tiny,data=prepared:{train_dir}")
        assert (c.data.source, c.data.arrayrecord_pattern, c.data.split) == ("arrayrecord", train_dir, "train")
        assert c.input.caption_field == c.eval.caption_field == field
        assert c.model.image_size == c.input.image_size == presets.CAPTIONER_IMAGE_SIZE
        coco = _config(name, "data=tfds:coco_captions,model=S,image_size=256")
        assert (coco.data.tfds_name, coco.data.tfds_split, coco.eval.split) == ("coco_captions", "train+restval", "val")
        assert coco.data.tfds_caption_keys.to_dict() == {field: "captions/text"}
        assert (coco.data.tfds_image_key, coco.data.tfds_id_key) == ("image", "image/id")
        assert coco.model.image_size == coco.input.image_size == 256  # image_size=N wins
    rc = _config("recaption", f"tiny,data=prepared:{root}/{{split}}")
    assert rc.data.arrayrecord_pattern == f"{root}/{{split}}" and rc.data.split == "train"
    rc = _config("recaption", "data=tfds:coco_captions")
    assert rc.data.tfds_caption_keys.to_dict() == {"alt": "captions/text"}

    t = _config("t2i", f"tiny,data=prepared:{train_dir},caption=alt")
    assert (t.data.source, t.eval.source, t.eval.caption_field, t.eval.n_prompts) == ("arrayrecord", "data", "alt", 0)
    assert t.input.image_size == t.model.unet.image_size == presets.T2I_IMAGE_SIZE
    t = _config("t2i", "data=tfds:coco_captions,caption=dsc,records=data/recaptioned,image_size=128")
    # caption=dsc trains on the recaption job's records; the preset still turns world evals off.
    assert (t.data.source, t.data.arrayrecord_pattern, t.eval.caption_field) == ("arrayrecord", "data/recaptioned", "dsc")
    assert t.eval.n_prompts == 0 and t.input.image_size == 128
    assert _config("t2i", "tiny").eval.n_prompts > 0  # the world keeps prompt following
    # Latent diffusion on real data: 256 px images by default, the UNet sized to the latents.
    t = _config("t2i", f"data=prepared:{train_dir},caption=alt,autoencoder=tiny")
    assert t.input.image_size == presets.T2I_LATENT_IMAGE_SIZE and t.model.unet.image_size < t.input.image_size


def test_bad_presets_fail_clearly(tmp_path, prepared):
    with pytest.raises(ValueError, match=r"unknown data preset 'coco'; valid: world, prepared:DIR, tfds:NAME"):
        _config("captioner_pretrain", "data=coco")
    with pytest.raises(ValueError, match="unknown data preset 'tfds:'"):
        presets.parse("tfds:")
    with pytest.raises(FileNotFoundError, match="no folder .*nowhere.*launch/prepare.py"):
        _config("t2i", f"data=prepared:{tmp_path}/nowhere,caption=alt")
    with pytest.raises(FileNotFoundError, match="holds no \\*.array_record shards"):
        _config("recaption", f"data=prepared:{tmp_path}")
    with pytest.raises(ValueError, match="caption=descriptive_gt trains on the synthetic world"):
        _config("t2i", f"data=prepared:{prepared[1]}")
    with pytest.raises(ValueError, match="role='nope'"):
        presets.apply(_config("t2i", "tiny"), "world", role="nope")


def test_captioner_trains_on_prepared_shards(prepared, tmp_path):
    """The user's path: img2dataset tar -> prepare -> `:tiny,data=prepared:ROOT/{split}` for 2 steps,
    with the end-of-run evals on the held-out shards (loss and retrieval; no world parsers)."""
    root, _ = prepared
    config = _config("captioner_pretrain", f"tiny,data=prepared:{root}/{{split}},image_size=32")
    config.total_steps = config.checkpoint_every = 2
    config.eval.n_examples = 8
    workdir = str(tmp_path / "run")
    result = loop.train_and_evaluate(config, workdir, trainers.build_task(config, workdir))
    assert result["step"] == 2
    assert np.isfinite(result["val_loss"]) and 0.0 <= result["retrieval_i2t_r1"] <= 1.0
    assert result["n_examples"] == 8  # the eval folder, not the training one
    assert "fact_precision" not in result


class FakeCocoCaptions:
    """Builds, without TensorFlow, a dataset laid out as TFDS's coco_captions 2014 (v1.1.0) is:
    its features (tensorflow_datasets/object_detection/coco_captions.py) and Karpathy splits."""

    @staticmethod
    def build(data_dir: str) -> None:
        tfds = pytest.importorskip("tensorflow_datasets")
        f = tfds.features

        class Builder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
            name = "coco_captions"
            BUILDER_CONFIGS = [tfds.core.BuilderConfig(name="2014", version=tfds.core.Version("1.1.0"))]

            def _info(self):
                objects = f.Sequence({"id": np.int64, "area": np.int64, "bbox": f.BBoxFeature(),
                                      "label": f.ClassLabel(num_classes=80), "is_crowd": np.bool_})
                return tfds.core.DatasetInfo(builder=self, features=f.FeaturesDict({
                    "image": f.Image(encoding_format="jpeg"), "image/filename": f.Text(), "image/id": np.int64,
                    "objects": objects, "captions": f.Sequence({"text": np.str_, "id": np.int64})}))

            def _split_generators(self, dl_manager):
                return {"train": self._generate_examples(0, 3), "restval": self._generate_examples(3, 2),
                        "val": self._generate_examples(5, 2)}

            def _generate_examples(self, start, n):
                for i in range(start, start + n):
                    yield i, {"image": _jpeg(i), "image/filename": f"COCO_{i:012d}.jpg", "image/id": 1000 + i,
                              "objects": [],
                              "captions": [{"text": f"a cat on mat {i}", "id": 10 * i}, {"text": "other", "id": 1}]}

        Builder(data_dir=data_dir, file_format="array_record").download_and_prepare()


def test_coco_captions_from_tfds(tmp_path):
    data_dir = str(tmp_path / "tfds")
    FakeCocoCaptions.build(data_dir)
    config = _config("captioner_descriptive", "tiny,data=tfds:coco_captions,image_size=32")
    config.data.tfds_data_dir = data_dir
    train = sources.make_source(config.data)
    assert len(train) == 5  # train + restval
    rec = train[4]
    assert rec["id"] == "1004" and rec["captions"] == {"descriptive": "a cat on mat 4"}
    assert isinstance(rec["image"], bytes)  # decoded once, in the pipeline
    # The split the captioner's evals read (evals/captions.py: tfds_split = eval.split).
    assert len(sources.make_source({**config.data.to_dict(), "tfds_split": config.eval.split})) == 2
    # A T2I run on COCO's captions validates on COCO's val split with the same caption.
    t2i_config = _config("t2i", "tiny,data=tfds:coco_captions,caption=alt")
    t2i_config.data.tfds_data_dir = data_dir
    assert len(t2i_trainer.eval_source(t2i_config)) == 2
    tokenize = tokenizer_lib.Tokenize(tokenizer_lib.load_tokenizer(None))
    config.input.global_batch_size = 4
    batch = next(iter(pipeline.make_loader_from_config(train, config.input, tokenizer=tokenize)))
    assert batch["image"].shape == (4, 32, 32, 3) and batch["tokens"].shape == (4, config.input.max_text_len)
