"""The recipe end to end: the pipeline's stages (stages.py) and their runner (runner.py)."""
