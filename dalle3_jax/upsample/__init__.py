"""Prompt upsampling (stage 6 of the recipe): a short prompt becomes one descriptive prompt.

A T2I model trained on descriptive captions follows descriptive prompts best, so users' short
prompts are rewritten before sampling. Two upsamplers:

- `dalle3_jax.upsample.learned`: a learned local model, a small text model (models/upsampler.py)
  trained on (SSC caption, DSC caption) pairs of the same images, or the world's ground-truth
  (short, descriptive) pairs (configs/upsampler.py);
- `dalle3_jax.upsample.llm`: any OpenAI-compatible chat endpoint, asked with the project's own
  system prompt and few-shot examples for one description of 15-80 words.

    from dalle3_jax.upsample import learned
    learned.Upsampler.from_workdir("workdirs/upsampler").upsample(["a green star"], seed=0)

    from dalle3_jax.upsample import llm
    upsampler = llm.LLMUpsampler(llm.LLMConfig(base_url="http://localhost:8000/v1", model="my-model"))
    upsampler.upsample(["three blue squares"])   # -> ["Three small blue squares sit ..."]
"""
