"""Stage 3 of the recipe: captioning images with a trained captioner.

`decode` holds the jitted autoregressive decoders (greedy, beam search, sampling) that turn a
captioner and a batch of images into caption tokens; `job` is the sharded, resumable,
exactly-once recaption job (launch/recaption.py), with `captioners` (loading trained runs) and
`writer` (its output directory and per-shard commits).
"""

from dalle3_jax.recaption.decode import Settings, generate, generate_uncached

__all__ = ["Settings", "generate", "generate_uncached"]
