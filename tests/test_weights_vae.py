"""AutoencoderKL import: a small random diffusers VAE saved with save_pretrained, imported, and
compared with PyTorch on the same inputs (max abs difference <= 1e-4 in float32)."""

import json
import shutil

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch
from diffusers import AutoencoderKL as TorchAutoencoderKL
from flax import nnx
from safetensors.numpy import load_file, save_file

from dalle3_jax import models, sharding
from dalle3_jax.weights import CheckpointError
from dalle3_jax.weights.vae import load_autoencoder_kl

TOL = 1e-4
SIZE = 32  # image side; the 2-block models below have f = 2, so latents are 16 x 16


def _torch_vae(tmp_path_factory, name: str, **kw):
    """A random diffusers VAE saved under a fresh directory; every parameter is perturbed, so a
    norm scale mapped onto a bias (ones vs zeros at initialisation) cannot go unnoticed."""
    torch.manual_seed(0)
    vae = TorchAutoencoderKL(in_channels=3, out_channels=3, down_block_types=("DownEncoderBlock2D",) * 2,
                             up_block_types=("UpDecoderBlock2D",) * 2, block_out_channels=(16, 32),
                             layers_per_block=1, norm_num_groups=8, latent_channels=4, sample_size=SIZE, **kw).eval()
    with torch.no_grad():
        for p in vae.parameters():
            p.add_(0.1 * torch.randn_like(p))
    path = tmp_path_factory.mktemp(name)
    vae.save_pretrained(str(path), safe_serialization=True)
    return vae, path


def _reference(vae):
    """The torch VAE's posterior of fixed images and its decoding of fixed latents, as NHWC numpy."""
    g = torch.Generator().manual_seed(1)
    x = torch.rand(2, 3, SIZE, SIZE, generator=g) * 2 - 1
    z = torch.randn(2, 4, SIZE // 2, SIZE // 2, generator=g)
    with torch.no_grad():
        posterior = vae.encode(x).latent_dist
        out = vae.decode(z).sample
    nhwc = lambda t: t.numpy().transpose(0, 2, 3, 1)  # noqa: E731
    return dict(x=nhwc(x), z=nhwc(z), mean=nhwc(posterior.mean), logvar=nhwc(posterior.logvar), out=nhwc(out))


@pytest.fixture(scope="module")
def standard(tmp_path_factory):
    vae, path = _torch_vae(tmp_path_factory, "vae")
    return path, _reference(vae)


@pytest.fixture(scope="module")
def no_quant(tmp_path_factory):
    vae, path = _torch_vae(tmp_path_factory, "vae_noquant", use_quant_conv=False, use_post_quant_conv=False,
                           mid_block_add_attention=False, scaling_factor=0.3611, shift_factor=0.1159)
    return path, _reference(vae)


def _check_parity(model, ref):
    mean, logvar = model.encode(jnp.asarray(ref["x"]))
    assert mean.shape == (2, SIZE // 2, SIZE // 2, 4)
    np.testing.assert_allclose(np.asarray(mean), ref["mean"], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(logvar), ref["logvar"], atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.decode(jnp.asarray(ref["z"]))), ref["out"], atol=TOL, rtol=0)


def test_parity_with_diffusers(standard):
    path, ref = standard
    model, info = load_autoencoder_kl(path)
    assert not info["report"].unused_keys and not info["report"].unfilled
    assert (model.downsample_factor, model.latent_channels) == (2, 4)
    assert (model.scaling_factor, model.shift_factor) == (0.18215, 0)
    assert model.quant_conv is not None and model.encoder.mid.attn is not None
    _check_parity(model, ref)


def test_parity_without_quant_convs_or_attention(no_quant):
    path, ref = no_quant
    model, info = load_autoencoder_kl(path)
    assert model.quant_conv is None and model.post_quant_conv is None and model.decoder.mid.attn is None
    assert (info["config"].scaling_factor, model.shift_factor) == (0.3611, 0.1159)
    _check_parity(model, ref)


def test_older_attention_names_and_1x1_conv_weights(standard, tmp_path):
    """Checkpoints written before diffusers renamed the attention (query/key/value/proj_attn,
    here stored as 1x1 convolutions) import to the same model."""
    path, ref = standard
    old = {"to_q": "query", "to_k": "key", "to_v": "value", "to_out.0": "proj_attn"}
    tensors = {}
    for key, value in load_file(str(path / "diffusion_pytorch_model.safetensors")).items():
        for new, legacy in old.items():
            if f".attentions.0.{new}." in key:
                key = key.replace(f".{new}.", f".{legacy}.")
                value = value[:, :, None, None] if value.ndim == 2 else value
        tensors[key] = value
    assert "decoder.mid_block.attentions.0.proj_attn.weight" in tensors
    # Written as the vae/ folder of a whole pipeline directory, which is found from the top.
    (tmp_path / "vae").mkdir()
    save_file(tensors, str(tmp_path / "vae" / "diffusion_pytorch_model.safetensors"))
    shutil.copy(path / "config.json", tmp_path / "vae" / "config.json")
    model, info = load_autoencoder_kl(tmp_path)
    assert info["path"] == str(tmp_path / "vae")
    _check_parity(model, ref)


def test_bad_checkpoints_name_the_key(standard, tmp_path):
    path, _ = standard
    shutil.copy(path / "config.json", tmp_path / "config.json")
    good = load_file(str(path / "diffusion_pytorch_model.safetensors"))
    file = str(tmp_path / "diffusion_pytorch_model.safetensors")
    missing = {k: v for k, v in good.items() if k != "decoder.conv_out.bias"}
    extra = {**good, "decoder.extra.weight": np.zeros((1,), np.float32)}
    misshaped = {**good, "encoder.conv_in.weight": np.zeros((16, 3, 5, 5), np.float32)}
    for tensors, pattern in (
        (missing, r"'decoder\.conv_out\.bias', which is missing"),
        (extra, r"keys that nothing uses: \['decoder\.extra\.weight'\]"),
        (misshaped, r"encoder\.conv_in\.kernel.*\(3, 3, 3, 16\).*\(5, 5, 3, 16\)"
                    r".*encoder\.conv_in\.weight \(16, 3, 5, 5\)"),
    ):
        save_file(tensors, file)
        with pytest.raises(CheckpointError, match=pattern):
            load_autoencoder_kl(tmp_path)
    config = json.loads((path / "config.json").read_text())
    (tmp_path / "config.json").write_text(json.dumps({**config, "up_block_types": ["AttnUpDecoderBlock2D"] * 2}))
    with pytest.raises(CheckpointError, match="up_block_types"):
        load_autoencoder_kl(tmp_path)


def test_scaled_latents_round_trip(no_quant):
    path, ref = no_quant
    model, _ = load_autoencoder_kl(path)
    x = jnp.asarray(ref["x"])
    z = model.latents(x)
    np.testing.assert_allclose(np.asarray(z), (ref["mean"] - 0.1159) * 0.3611, atol=TOL, rtol=0)
    np.testing.assert_allclose(np.asarray(model.images_from_latents(z)),
                               np.asarray(model.decode(jnp.asarray(ref["mean"]))), atol=TOL, rtol=0)
    sample = model.latents(x, jax.random.key(0))
    assert sample.shape == z.shape and not np.allclose(sample, z)
    assert np.all(np.abs(np.asarray(sample - z)) < 10 * np.exp(0.5 * ref["logvar"]) * 0.3611)


def test_sharded_import_matches(standard, n_devices):
    path, ref = standard
    mesh = sharding.make_mesh({"data": 1, "fsdp": -1, "tensor": 1})
    model, _ = load_autoencoder_kl(path, mesh=mesh)
    kernel = model.decoder.conv_in.kernel[...]  # [3, 3, 4, 32]: conv_in (4) does not split 8 ways
    names = ("conv_spatial", "conv_spatial", "conv_in", "conv_out")
    assert kernel.sharding.spec == sharding.spec_for(names, kernel.shape, mesh)
    assert model.encoder.mid.block1.conv1.kernel[...].sharding.spec[2] == "fsdp"  # 32 input channels: split
    with jax.set_mesh(mesh):
        out = nnx.jit(lambda m, z: m.decode(z))(model, jnp.asarray(ref["z"]))
    np.testing.assert_allclose(np.asarray(out), ref["out"], atol=TOL, rtol=0)


def test_registry_variants_shapes():
    """The tiny variant maps 128 px to 32 x 32 latents; sd has the SD VAE's size and factor 8."""
    tiny = nnx.eval_shape(lambda: models.get("autoencoder_kl"))
    images = jax.ShapeDtypeStruct((2, 128, 128, 3), jnp.float32)
    mean, logvar = nnx.eval_shape(lambda m, x: m.encode(x), tiny, images)
    assert mean.shape == logvar.shape == (2, 32, 32, 4) and tiny.downsample_factor == 4
    assert nnx.eval_shape(lambda m, z: m.images_from_latents(z), tiny, mean).shape == (2, 128, 128, 3)
    sd = nnx.eval_shape(lambda: models.get("autoencoder_kl", models.config("autoencoder_kl", "sd")))
    assert sd.downsample_factor == 8 and models.param_count(sd) == 83_653_863
    with pytest.raises(ValueError, match="NHWC"):
        nnx.eval_shape(lambda m, x: m.encode(x), tiny, jax.ShapeDtypeStruct((2, 3, 128, 128), jnp.float32))
