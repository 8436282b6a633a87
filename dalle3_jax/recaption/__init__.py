"""Stage 3 of the recipe: captioning images with a trained captioner.

`decode` holds the jitted autoregressive decoders (greedy, beam search, sampling) that turn a
captioner and a batch of images into caption tokens.
"""

from dalle3_jax.recaption.decode import Settings, generate, generate_uncached

__all__ = ["Settings", "generate", "generate_uncached"]
