"""Training: the recipe, the stage kinds, the loop, checkpoints, the runtime and the run log."""
