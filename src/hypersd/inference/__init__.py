"""``hypersd generate``: images from a model and a LoRA through diffusers' pipelines.

The pipeline's scheduler runs on hypersd's segment boundaries (``schedule.inference_timesteps``),
so a hypersd LoRA gives here the images ``sampling.sample_tcd`` gives in training and evaluation.
Both schedulers end at x0, as hypersd's sampler does: diffusers' own DDIM and TCD, with SD's
config, stop at ᾱ_0 = 0.99915 instead (docs/METHOD.md, "Sampling").

Which steps, scheduler, eta and guidance a LoRA is sampled with comes, in this order, from the
command line, from the LoRA (a published Hyper-SD file by its name, a hypersd file by its
metadata), or from the model's defaults. docs/GENERATE.md has the published recipes.

- ``recipes``: what a LoRA brings (a published file's recipe, a hypersd file's metadata)
- ``plan``: the command line over the recipe over the model's defaults, and the timesteps
- ``schedulers``: diffusers' DDIM and TCD, ending at x0
- ``models``: the backbone of a model, and loading it (hub id, folder, single file)
- ``pipeline``: a diffusers pipeline over the loaded modules, with the LoRA fused in
- ``generator``: ``Generator``, which makes the images (eager or compiled)
- ``choices``: compile, dtype
- ``jobs``: prompt files, one file and seed per image, PNGs with their settings
- ``cli``: the ``generate`` command and the sampling flags ``eval --model`` shares

torch is imported where it is used: building the command line imports none of it.
"""
