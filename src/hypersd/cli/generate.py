"""The ``generate`` command, and the sampling flags ``eval --model`` shares with it."""

from __future__ import annotations

from typing import TYPE_CHECKING

from hypersd.device import resolve_device
from hypersd.errors import HypersdError
from hypersd.inference.choices import COMPILE, COMPILE_MIN_IMAGES, DTYPES, pick_compile
from hypersd.inference.jobs import plan_jobs, read_prompts, run_jobs
from hypersd.inference.schedulers import SCHEDULERS

if TYPE_CHECKING:
    from hypersd.inference.generator import Generator


def add_sampling_args(p, shared: tuple[str, ...] = ()) -> None:
    """The model, LoRA and sampler options ``generate`` and ``eval --model`` share; ``shared``:
    the flags among them that the parser already has."""
    p.add_argument("--lora", default=None, help="a LoRA .safetensors: hypersd's, a published Hyper-SD file, "
                                                "kohya's or diffusers' (default: the model alone)")
    p.add_argument("--backbone", choices=("sd15", "sdxl", "sd3", "flux"), default=None,
                   help="the model's backbone (default: read from its UNet or transformer config)")
    p.add_argument("--model-config", default=None,
                   help="for a single-file --model: a diffusers folder or hub id with its component configs")
    if "--steps" not in shared:
        p.add_argument("--steps", type=int, default=None,
                       help="sampling steps (default: the LoRA's recipe; 25 without a LoRA)")
    p.add_argument("--scheduler", choices=SCHEDULERS, default=None,
                   help="tcd or ddim (trailing); default: the LoRA's recipe, else ddim")
    p.add_argument("--eta", type=float, default=None, help="TCD's gamma, 0 to 1 (0: DDIM; on SD3/FLUX, Euler)")
    if "--guidance" not in shared:
        p.add_argument("--guidance", type=float, default=None,
                       help="CFG scale; 0 or 1: none (default: the LoRA's recipe; the model's own without a LoRA)")
    p.add_argument("--lora-scale", type=float, default=None,
                   help="multiplies the LoRA's effect (default: the LoRA's recipe, e.g. 0.125 for the published "
                        "Hyper-SD3 and Hyper-FLUX files; else 1)")
    p.add_argument("--negative-prompt", default=None, help="the unconditional prompt when guidance > 1")
    p.add_argument("--width", type=int, default=None, help="image width in pixels (default: the model's own)")
    p.add_argument("--height", type=int, default=None, help="image height in pixels (default: the model's own)")
    p.add_argument("--seed", type=int, default=0, help="image j uses seed + j")
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--device", default="auto", help="cuda, cuda:1, cpu (default: cuda if there is one)")
    p.add_argument("--dtype", default="auto", choices=("auto", *DTYPES),
                   help="default: float16 on a GPU, float32 on a CPU")
    p.add_argument("--compile", default="auto", choices=COMPILE,
                   help=f"compile the UNet and the VAE decoder (with CUDA graphs on a GPU); kept only if the first "
                        f"batch gives eager's images faster. auto: on a GPU from {COMPILE_MIN_IMAGES} images on")


def generator_from_args(a, steps: int | None, n_images: int = 1) -> Generator:
    from hypersd.inference.generator import Generator

    return Generator(a.model, a.lora, backbone=a.backbone, steps=steps,
                     scheduler=a.scheduler, eta=a.eta, guidance=a.guidance, lora_scale=a.lora_scale,
                     negative_prompt=a.negative_prompt, device=a.device, dtype=a.dtype, config=a.model_config,
                     compile=pick_compile(a.compile, resolve_device(a.device), n_images),
                     width=a.width, height=a.height)


def prompts_from_args(a) -> list[str]:
    if bool(a.prompt) == bool(a.prompts):
        raise HypersdError("pass --prompt TEXT (repeatable) or --prompts FILE (one prompt per line), not both")
    return list(a.prompt) if a.prompt else read_prompts(a.prompts)


def cmd_generate(a) -> None:
    prompts = prompts_from_args(a)
    jobs = plan_jobs(prompts, a.out, a.per_prompt, a.seed, a.force)
    gen = generator_from_args(a, a.steps, len(jobs))
    p = gen.plan
    print(f"{p.backbone} {p.model}" + (f" + {p.lora}" if p.lora else "") +
          f": {p.steps} steps {p.scheduler} (timesteps {p.timesteps}), eta {p.eta:g}, guidance {p.guidance:g} "
          f"({p.passes} pass{'es' * (p.passes > 1)} a step{', a CFG LoRA' * (p.cfg == 'preserve')}) [{p.recipe}]"
          + (f"; lora scale {p.lora_scale:g} [{p.lora_scale_from}]" if p.lora else ""))
    written = run_jobs(gen, jobs, a.batch_size, progress=not a.quiet)
    print(f"wrote {len(written)} images to {a.out}; path: {gen.path_note}")


def add_generate_parser(sub) -> None:
    g = sub.add_parser("generate", help="images from SD1.5/SDXL/SD3/FLUX.1 and a LoRA (hypersd's or a published Hyper-SD file)",
                       description="Generates PNGs through diffusers' pipelines, on hypersd's segment boundaries; "
                                   "each PNG holds its prompt and settings in its metadata. A published Hyper-SD "
                                   "LoRA gets its published recipe (docs/GENERATE.md).")
    g.add_argument("--model", required=True, help="a hub id, a local diffusers folder or a single .safetensors file")
    add_sampling_args(g)
    g.add_argument("--prompt", action="append", default=[], help="a prompt (repeatable)")
    g.add_argument("--prompts", default=None, help="a text file, one prompt per line")
    g.add_argument("--per-prompt", type=int, default=1, help="images per prompt")
    g.add_argument("--out", required=True, help="output folder (images 00000.png, 00001.png, ...)")
    g.add_argument("--force", action="store_true", help="overwrite existing images")
    g.add_argument("--quiet", action="store_true", help="no progress bar")
    g.set_defaults(fn=cmd_generate)
