"""The autoencoder trainer (configs/autoencoder.py:tiny) through the shared loop: 32 px images,
a narrower model than the tiny variant and one device, to keep the test to seconds."""

import os

import numpy as np
import pytest
from flax import nnx

from dalle3_jax import checkpoint, configlib, models, trainers
from dalle3_jax.trainers import loop

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
NARROW = dict(block_out_channels=(8, 16, 16), norm_num_groups=4)


def _tiny_config():
    config = configlib.load_config_file(os.path.join(ROOT, "configs", "autoencoder.py:tiny,image_size=32"))
    config.total_steps, config.checkpoint_every, config.input.global_batch_size = 2, 2, 8
    config.model.update(NARROW)
    config.mesh.num_devices = 1
    return config


def test_trains_evaluates_and_restores_as_a_model(tmp_path):
    config = _tiny_config()
    result = loop.train_and_evaluate(config, str(tmp_path), trainers.build_task(config, str(tmp_path)))
    assert result["step"] == 2 and np.isfinite(result["psnr"]) and result["suggested_scaling_factor"] > 0
    # The saved model loads into a model built from its config, as latent T2I reads it.
    model = nnx.eval_shape(lambda: models.get("autoencoder_kl", models.config("autoencoder_kl", "tiny", **NARROW)))
    assert checkpoint.load_model_weights(str(tmp_path / "checkpoints"), model, prefix="model") == 2
    assert model.encode(np.zeros((1, 32, 32, 3), np.float32))[0].shape == (1, 8, 8, 4)


def test_bad_settings_are_refused(tmp_path):
    config = _tiny_config()
    config.loss.reconstruction = "lpips"
    with pytest.raises(ValueError, match="reconstruction"):
        trainers.build_task(config, str(tmp_path))
    config = _tiny_config()
    config.input.image_size = 30
    with pytest.raises(ValueError, match="downsample factor 4"):
        trainers.build_task(config, str(tmp_path))
