"""dalle3_jax: the DALL-E 3 recipe (better captions -> better prompt following) in JAX."""

from setuptools import find_packages, setup

INSTALL_REQUIRES = [
    "jax>=0.10.2,<0.11",
    "flax>=0.12.8,<0.13",
    "optax>=0.2.8,<0.3",
    "orbax-checkpoint>=0.12.8,<0.13",
    "grain>=0.2.18,<0.3",
    "tensorflow-datasets>=4.9.10,<4.10",
    "array-record>=0.8,<0.9",
    "transformers>=5.0,<6",
    "tokenizers>=0.22,<0.24",
    "ml_collections>=1.0,<2",
    "pillow>=10,<14",
    "numpy>=1.26,<3",
    "absl-py>=2.1,<3",
    "tensorboardX>=2.6,<3",
    "pyarrow>=14,<27",
    "matplotlib>=3.8,<4",  # the pipeline report's figures
    "safetensors>=0.4,<1",  # pretrained weight import (numpy reader, no PyTorch at run time)
]

setup(
    name="dalle3_jax",
    version="0.1.0",
    description="Open, JAX-native implementation of the DALL-E 3 better-captions recipe.",
    python_requires=">=3.10",
    packages=find_packages(include=["dalle3_jax", "dalle3_jax.*"]),
    package_data={"dalle3_jax": ["assets/**/*"]},
    include_package_data=True,
    install_requires=INSTALL_REQUIRES,
    extras_require={
        # nbclient / nbformat / ipykernel: tests/test_recipe_pipeline.py executes notebooks/quickstart.ipynb
        "test": ["pytest>=8,<10", "pytest-timeout>=2.3,<3",
                 "nbclient>=0.10,<1", "nbformat>=5.10,<6", "ipykernel>=6.29,<8",
                 # PyTorch CPU builds random reference models for the weight-import parity tests
                 # (dalle3_jax/weights); never imported by the library itself.
                 "torch==2.13.0", "diffusers>=0.35,<1",
                 "pytest-xdist>=3.6,<4"],  # two test workers (pyproject.toml addopts)
        "bench": [],
    },
)
