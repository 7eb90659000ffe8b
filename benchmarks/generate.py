"""Time end-to-end image generation at batch 1: text encoder(s), k UNet steps, VAE decode.

SD1.5 at 512 px and SDXL at 1024 px, the real architectures with random weights (compute does
not depend on weight values), bf16, a distilled LoRA fused into the UNet (as ``hypersd`` samples:
no LoRA matmuls at inference). Token ids are given: tokenising is CPU work outside the GPU path.

  eager       plain PyTorch, one kernel launch after another
  graph       the whole pipeline captured once as a CUDA graph and replayed: the launches of
              ~1,000 small kernels collapse into one (at batch 1 the GPU otherwise waits on Python)
  compile     the UNet's and the VAE's repeated blocks compiled (fused elementwise work), then
              captured as a CUDA graph the same way
  pipeline    what ``hypersd generate`` runs: diffusers' pipeline with hypersd's scheduler, eager
              and with ``--compile`` (speed.CompiledInference: UNet and VAE decoder compiled with
              reduce-overhead, i.e. CUDA graphs), prompt embeddings from the same text encoder(s)

Each fast variant is checked against eager on the same inputs (max |Δ| of the image in [-1, 1]).

  python benchmarks/generate.py [--models sd15,sdxl] [--steps 1,4] [--budget 240] [--json out.json]
  python benchmarks/generate.py --tiny      # CPU check that the sampler matches hypersd's
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import timed  # noqa: E402

from hypersd.core.schedule import inference_timesteps  # noqa: E402
from hypersd.nets import archs, speed  # noqa: E402

TINY_UNET = dict(block_out_channels=(32, 64), attention_head_dim=(2, 4), layers_per_block=1, sample_size=16,
                 down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
                 up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))
TINY_VAE = dict(block_out_channels=(32, 64), down_block_types=("DownEncoderBlock2D",) * 2,
                up_block_types=("UpDecoderBlock2D",) * 2, layers_per_block=1)


class Pipeline:
    """Prompt ids and noise in, image out, with no host work inside (so it can be graphed)."""

    def __init__(self, backbone: str, device, dtype, tiny: bool = False):
        self.backbone, self.device = backbone, device
        torch.manual_seed(0)
        if tiny:
            extra = dict(cross_attention_dim=32)
            if backbone == "sdxl":
                extra = dict(cross_attention_dim=64, transformer_layers_per_block=(1, 2), addition_time_embed_dim=8,
                             projection_class_embeddings_input_dim=6 * 8 + 32)
            self.unet = archs.unet(backbone, device, dtype, **TINY_UNET, **extra)
            self.vae = archs.vae(backbone, device, dtype, **TINY_VAE)
            self.encoders = _tiny_encoders(backbone, device, dtype)
        else:
            self.unet = archs.unet(backbone, device, dtype)
            self.vae = archs.vae(backbone, device, dtype)
            self.encoders = archs.text_encoders(backbone, device, dtype)
        self.acp = archs.alphas_cumprod()
        size = self.unet.config.sample_size
        self.ids = torch.randint(1, 49000 if not tiny else 90, (1, archs.TOKENS if not tiny else 8), device=device)
        self.noise = torch.randn((1, 4, size, size), device=device, dtype=dtype)
        res = float(size * 2 ** (len(self.vae.config.block_out_channels) - 1))  # the VAE's scale: 8
        self.time_ids = torch.tensor([[res, res, 0.0, 0.0, res, res]], device=device, dtype=dtype)
        # timestep inputs made once: creating them inside the pipeline would copy host to device
        self._t = {t: torch.full((1,), t, device=device, dtype=torch.long) for t in range(len(self.acp))}

    def encode(self):
        if self.backbone == "sd15":
            return self.encoders[0](self.ids)[0], {}
        one = self.encoders[0](self.ids, output_hidden_states=True)
        two = self.encoders[1](self.ids, output_hidden_states=True)
        hidden = torch.cat([one.hidden_states[-2], two.hidden_states[-2]], dim=-1)
        return hidden, {"added_cond_kwargs": {"text_embeds": two.text_embeds, "time_ids": self.time_ids}}

    def __call__(self, steps: int) -> torch.Tensor:
        hidden, added = self.encode()
        x = self.noise
        timesteps = inference_timesteps(steps, len(self.acp))
        for i, t in enumerate(timesteps):
            # DDIM on the trailing grid (TCD with γ = 0); coefficients as Python floats: no host sync
            a_t = float(self.acp[t])
            a_s = float(self.acp[timesteps[i + 1]]) if i + 1 < len(timesteps) else 1.0
            eps = self.unet(x, self._t[t], encoder_hidden_states=hidden, **added).sample
            x0 = (x - (1 - a_t) ** 0.5 * eps) / a_t ** 0.5
            x = a_s ** 0.5 * x0 + (1 - a_s) ** 0.5 * eps
        return self.vae.decode(x / self.vae.config.scaling_factor).sample.clamp(-1, 1)


def _tiny_encoders(backbone, device, dtype):
    from transformers import CLIPTextConfig, CLIPTextModel, CLIPTextModelWithProjection

    cfg = dict(vocab_size=100, hidden_size=32, intermediate_size=37, num_hidden_layers=2, num_attention_heads=4,
               projection_dim=32, max_position_embeddings=8)
    out = [CLIPTextModel(CLIPTextConfig(**cfg))]
    if backbone == "sdxl":
        out.append(CLIPTextModelWithProjection(CLIPTextConfig(**cfg)))
    return [m.to(device=device, dtype=dtype).eval() for m in out]


def graphed(fn):
    """Capture ``fn`` (no arguments, fixed input buffers) as a CUDA graph; returns replay -> output."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):  # warm-up on a side stream, as capture requires (cuDNN/cuBLAS handles, autotune)
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()

    def replay():
        graph.replay()
        return out

    return replay


@torch.no_grad()
def run(a):
    cuda = torch.cuda.is_available() and not a.tiny
    device = torch.device("cuda" if cuda else "cpu")
    dtype = torch.bfloat16 if cuda else torch.float32
    t_start, rows = time.perf_counter(), []

    def record(row):
        rows.append(row)
        print(json.dumps(row), flush=True)
        if a.json:
            Path(a.json).write_text(json.dumps(rows, indent=1))

    if cuda:
        speed.enable_tf32()
        print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    for backbone in a.models.split(","):
        p = Pipeline(backbone, device, dtype, tiny=a.tiny)
        speed.channels_last(p.unet)
        speed.channels_last(p.vae)
        steps_list = [int(s) for s in a.steps.split(",")]
        ref = {k: p(k).float() for k in steps_list}
        for k in steps_list:
            ms = 1000 * timed(lambda: p(k), 2, a.iters, device)[0]
            record({"model": backbone, "steps": k, "variant": "eager", "ms": round(ms, 2), "max_abs_diff": 0.0})
        if not cuda:
            pipeline_rows(p, steps_list, ref, a, record, compile=False)
            continue
        for k in steps_list:
            try:
                replay = graphed(lambda k=k: p(k))
                diff = (replay().float() - ref[k]).abs().max().item()
                ms = 1000 * timed(replay, 2, a.iters, device)[0]
                record({"model": backbone, "steps": k, "variant": "graph", "ms": round(ms, 2), "max_abs_diff": diff})
                del replay
            except Exception as e:  # report and go on: the other variants still measure
                record({"model": backbone, "steps": k, "variant": "graph", "error": f"{type(e).__name__}: {e}"[:300]})
        left = a.budget - (time.perf_counter() - t_start)
        pipeline_rows(p, steps_list, ref, a, record, compile=a.compile and left >= a.compile_reserve)
        left = a.budget - (time.perf_counter() - t_start)
        if not a.compile or left < a.compile_reserve:
            print(f"  {backbone}: compile skipped ({left:.0f} s left)", flush=True)
            continue
        t_c = time.perf_counter()
        speed.compile_blocks(p.unet)
        speed.compile_blocks(p.vae, kinds=("ResnetBlock2D",))
        for k in steps_list:
            try:
                for _ in range(2):  # compile outside the capture
                    p(k)
                replay = graphed(lambda k=k: p(k))
                diff = (replay().float() - ref[k]).abs().max().item()
                ms = 1000 * timed(replay, 2, a.iters, device)[0]
                record({"model": backbone, "steps": k, "variant": "compile+graph", "ms": round(ms, 2),
                        "max_abs_diff": diff, "compile_s": round(time.perf_counter() - t_c, 1)})
                del replay
            except Exception as e:
                record({"model": backbone, "steps": k, "variant": "compile+graph",
                        "error": f"{type(e).__name__}: {e}"[:300]})
            t_c = time.perf_counter()
        del p
        torch.cuda.empty_cache()
    print("\n| model | steps | variant | ms | max abs diff vs eager |")
    print("|---|---|---|---|---|")
    for r in rows:
        print(f"| {r['model']} | {r['steps']} | {r['variant']} | {r.get('ms', r.get('error', ''))} "
              f"| {r.get('max_abs_diff', '')} |")
    return rows


def pipeline_rows(p: Pipeline, steps_list, ref, a, record, compile: bool) -> None:
    """hypersd generate's path on the same modules: diffusers' pipeline, eager then compiled."""
    from diffusers import StableDiffusionPipeline, StableDiffusionXLPipeline

    from hypersd.inference.schedulers import make_scheduler

    scheduler = make_scheduler("tcd", archs.SCHEDULE)
    if p.backbone == "sdxl":
        pipe = StableDiffusionXLPipeline(vae=p.vae, text_encoder=p.encoders[0], text_encoder_2=p.encoders[1],
                                         tokenizer=None, tokenizer_2=None, unet=p.unet, scheduler=scheduler,
                                         add_watermarker=False)
    else:
        pipe = StableDiffusionPipeline(vae=p.vae, text_encoder=p.encoders[0], tokenizer=None, unet=p.unet,
                                       scheduler=scheduler, safety_checker=None, feature_extractor=None,
                                       requires_safety_checker=False)
    pipe.set_progress_bar_config(disable=True)

    def call(k):
        hidden, added = p.encode()
        extra = {"pooled_prompt_embeds": added["added_cond_kwargs"]["text_embeds"]} if added else {}
        return pipe(prompt_embeds=hidden, **extra, guidance_scale=0.0, latents=p.noise, output_type="pt",
                    timesteps=inference_timesteps(k, len(p.acp)), eta=0.0).images.mul(2).sub(1)

    fast = speed.CompiledInference(pipe, p.vae, mode="reduce-overhead") if compile else None
    for compiled in (False, True) if compile else (False,):
        if fast:
            fast.use(compiled)
        variant = "pipeline+compile" if compiled else "pipeline"
        t_c = time.perf_counter()
        for k in steps_list:
            try:
                for _ in range(3):  # compile and record the graphs outside the timing
                    call(k)
                diff = (call(k).float() - ref[k]).abs().max().item()
                ms = 1000 * timed(lambda: call(k), 2, a.iters, p.device)[0]
                record({"model": p.backbone, "steps": k, "variant": variant, "ms": round(ms, 2), "max_abs_diff": diff,
                        **({"compile_s": round(time.perf_counter() - t_c, 1)} if compiled else {})})
            except Exception as e:
                record({"model": p.backbone, "steps": k, "variant": variant, "error": f"{type(e).__name__}: {e}"[:300]})
            t_c = time.perf_counter()


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--steps", default="1,4")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--budget", type=float, default=240, help="seconds; compile parts are skipped past it")
    p.add_argument("--compile-reserve", type=float, default=60)
    p.add_argument("--tiny", action="store_true")
    p.add_argument("--json", default=None)
    return run(p.parse_args(argv))


if __name__ == "__main__":
    main()
