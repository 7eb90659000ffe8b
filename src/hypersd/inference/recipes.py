"""What a LoRA brings to sampling: a published Hyper-SD file's recipe, a hypersd file's metadata."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

from hypersd.errors import HypersdError

# Hyper-SD's released LoRA files: Hyper-SD15-1step-lora, Hyper-SDXL-8steps-CFG-lora, ...
_PUBLISHED = re.compile(r"hyper-sd(15|xl)-(\d+)steps?(-cfg)?-lora", re.IGNORECASE)
# ... and the flow ones: Hyper-SD3-{4,8,16}steps-CFG-lora, Hyper-FLUX.1-dev-{8,16}steps-lora
_PUBLISHED_FLOW = re.compile(r"hyper-(sd3|flux\.1-dev)-(\d+)steps?(-cfg)?-lora", re.IGNORECASE)
# The release's model card (huggingface.co/ByteDance/Hyper-SD, README news of Aug 19 and Aug 26, 2024):
# SD3 CFG LoRAs at "guidance scale 3.0/5.0/7.0 at 4/8/16-steps", fused "with a relatively small scale
# (e.g. 0.125 that is adaptive with training)"; FLUX.1-dev LoRAs at "LoRA scales around 0.125" with
# "guidance scale ... kept on 3.5". Its diffusers examples keep the pipeline's own
# FlowMatchEulerDiscreteScheduler (no scheduler is swapped in), so the pipelines' default sigmas.
_SD3_GUIDANCE = {4: 3.0, 8: 5.0, 16: 7.0}
FLOW_LORA_SCALE = 0.125
FLUX_GUIDANCE = 3.5


@dataclass
class Recipe:
    """Sampling defaults a LoRA brings; None leaves the choice to the next source."""

    steps: int | None = None
    scheduler: str | None = None
    eta: float | None = None
    guidance: float | None = None
    backbone: str | None = None
    one_step_t: int | None = None
    # a hypersd LoRA's measured eta per step count ("4": 0.3), preferred over ``eta`` at those counts
    etas: dict | None = None
    source: str = "model defaults"
    # trained on hypersd's segment boundaries: a step count without boundaries is refused
    on_boundaries: bool = False
    # the scale the LoRA is fused at when --lora-scale is not given (None: 1)
    lora_scale: float | None = None
    # a flow model's pipeline sigmas as its stock scheduler spaces them, not hypersd's boundaries
    stock_sigmas: bool = False
    # "preserve": a CFG LoRA, made to be sampled with classifier-free guidance (two passes a step, the
    # negative prompt in the unconditional one); "bake": guidance distilled in; None: not known
    cfg: str | None = None


def published_recipe(path: str | Path) -> Recipe | None:
    """The recipe Hyper-SD's authors published for one of their LoRA files, known by its name.

    N-step LoRAs: DDIM trailing, no CFG. The 1-step LoRA is the unified one: TCD with eta 1 at any
    of 1 to 8 steps. The CFG LoRAs keep classifier-free guidance: 5 (they publish 5 to 8)."""
    m = _PUBLISHED.search(Path(path).name)
    if not m:
        return _published_flow_recipe(path)
    backbone = "sd15" if m.group(1) == "15" else "sdxl"
    steps, cfg = int(m.group(2)), bool(m.group(3))
    source = f"published Hyper-SD recipe for {m.group(0)}"
    if cfg:
        return Recipe(steps, "ddim", 0.0, 5.0, backbone, source=source, cfg="preserve")
    if steps == 1:
        return Recipe(1, "tcd", 1.0, 0.0, backbone, source=source)
    return Recipe(steps, "ddim", 0.0, 0.0, backbone, source=source)


def _published_flow_recipe(path: str | Path) -> Recipe | None:
    """Hyper-SD3 (CFG, 4/8/16 steps) and Hyper-FLUX.1-dev (8/16 steps): Euler on the stock sigmas,
    LoRA scale 0.125; SD3 with its published CFG per step count, FLUX with embedded guidance 3.5."""
    m = _PUBLISHED_FLOW.search(Path(path).name)
    if not m:
        return None
    steps, source = int(m.group(2)), f"published Hyper-SD recipe for {m.group(0)}"
    if m.group(1).lower() == "sd3":
        if steps not in _SD3_GUIDANCE or not m.group(3):
            return None  # not a file of the release: no recipe is known for it
        return Recipe(steps, "ddim", 0.0, _SD3_GUIDANCE[steps], "sd3", source=source,
                      lora_scale=FLOW_LORA_SCALE, stock_sigmas=True, cfg="preserve")
    if steps not in (8, 16) or m.group(3):
        return None
    return Recipe(steps, "ddim", 0.0, FLUX_GUIDANCE, "flux", source=source, lora_scale=FLOW_LORA_SCALE,
                  stock_sigmas=True)


def hypersd_recipe(meta: dict, path) -> Recipe:
    """A hypersd LoRA's own metadata: its guidance (a CFG LoRA's: the one it was trained for), its
    one-step timestep, TCD form; per step count, the eta measured at the end of its run, else the
    one multi-step DMD trained that step count's sampler at."""
    etas = {**(meta.get("trained_eta") or {}), **(meta.get("recommended_eta") or {})} or None
    return Recipe(scheduler="tcd", eta=0.0, guidance=meta.get("guidance"), backbone=meta.get("backbone"),
                  one_step_t=meta.get("one_step_t"), etas=etas,
                  source=f"hypersd LoRA metadata of {Path(path).name}", on_boundaries=True, cfg=meta.get("cfg"))


def lora_recipe(path: str | Path) -> tuple[Recipe, dict | None]:
    """(recipe, hypersd metadata or None) of a LoRA file, read without loading its weights."""
    from hypersd.outputs import read_metadata

    path = Path(path)
    if not path.is_file():
        raise HypersdError(f"LoRA file {path} not found")
    if path.suffix != ".safetensors":
        raise HypersdError(f"{path} is not a .safetensors file; hypersd loads LoRAs in safetensors only")
    meta = read_metadata(path, "LoRA")
    if meta:
        return hypersd_recipe(meta, path), meta
    return published_recipe(path) or Recipe(source=f"no recipe known for {path.name}"), None
