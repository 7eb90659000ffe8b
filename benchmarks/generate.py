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

SD3-medium, SD3.5-large and FLUX.1-dev (``--flow-models``; 1024 px, bf16, random weights of the
released configs): the text encoders (CLIP(s) and T5-XXL on given token ids), k transformer steps of
hypersd's sampler on the model's own boundaries, and the 16-channel VAE's decode, per
``--flow-options`` entry: the transformer in bf16 with a rank-64 LoRA fused into it, or its linear
weights quantized (int8, fp8, nf4) with the LoRA beside them, unfused (as hypersd runs a LoRA on a
quantized base: nets/quant.py), the image's max |Δ| against bf16's and the resident GiB.

  python benchmarks/generate.py [--models sd15,sdxl] [--steps 1,4] [--budget 240] [--json out.json]
  python benchmarks/generate.py --models '' --flow-models sd3,flux --flow-options bf16,int8,nf4
  python benchmarks/generate.py --tiny      # CPU check that the sampler matches hypersd's (also --dry)
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
    flow_rows(a, record, device, dtype)
    for backbone in [m for m in a.models.split(",") if m]:
        p = Pipeline(backbone, device, dtype, tiny=a.tiny)
        speed.channels_last(p.unet)
        speed.channels_last(p.vae)
        steps_list = [int(s) for s in a.steps.split(",")]
        ref = {k: p(k).float() for k in steps_list}
        for k in steps_list:
            ms = 1000 * timed(lambda p=p, k=k: p(k), 2, a.iters, device)[0]
            record({"model": backbone, "steps": k, "variant": "eager", "ms": round(ms, 2), "max_abs_diff": 0.0})
        if not cuda:
            pipeline_rows(p, steps_list, ref, a, record, compile=False)
            continue
        for k in steps_list:
            try:
                replay = graphed(lambda p=p, k=k: p(k))
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
                replay = graphed(lambda p=p, k=k: p(k))
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
              f"| {r.get('max_abs_diff', '')} |" + (f" resident {r['resident_gib']} GiB |" if "resident_gib" in r else ""))
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


class FlowPipeline:
    """Token ids and noise in, image out: a flow model's encoders, transformer steps and decode."""

    def __init__(self, name: str, device, dtype, tiny: bool, quantize: str):
        from flow_models import flow_teacher
        from transformers import T5Config, T5EncoderModel

        from hypersd import lora
        from hypersd.teachers.base import Cond

        self.cond_cls = Cond
        self.t = flow_teacher(name, device, dtype, tiny=tiny, quantize=quantize)
        unet = self.t.unet
        lora.add_lora(unet, lora.lora_config(4 if tiny else 64, None, "transformer"), lora.STUDENT)
        g = torch.Generator().manual_seed(5)
        with torch.no_grad():
            for p in lora.adapter_params(unet, lora.STUDENT):
                p.copy_((torch.randn(p.shape, generator=g) * 0.01).to(p.device))
        lora.activate(unet, lora.STUDENT)
        self.lora = lora
        cfg = unet.config
        if tiny:
            from transformers import CLIPTextConfig, CLIPTextModelWithProjection

            clip = dict(vocab_size=100, hidden_size=16, intermediate_size=37, num_hidden_layers=2,
                        num_attention_heads=4, projection_dim=cfg.pooled_projection_dim // (1 if name == "flux" else 2),
                        max_position_embeddings=8)
            n_clip = 1 if name == "flux" else 2
            self.clips = [CLIPTextModelWithProjection(CLIPTextConfig(**clip)).to(device, dtype).eval()
                          for _ in range(n_clip)]
            self.t5 = T5EncoderModel(T5Config(vocab_size=100, d_model=cfg.joint_attention_dim, d_kv=8, d_ff=37,
                                              num_layers=2, num_heads=4)).to(device, dtype).eval()
            self.vae = archs.vae("sd15", device, dtype, **TINY_VAE, latent_channels=16)
        else:
            *self.clips, self.t5 = archs.flow_text_encoders(name, device, dtype)
            self.vae = archs.vae("sd15", device, dtype, **(archs.FLOW_VAE | {"scaling_factor": 1.0}))
        self.tiny, self.name = tiny, name
        clip_len = 8 if tiny else archs.TOKENS
        self.clip_ids = torch.randint(1, 90 if tiny else 49000, (1, clip_len), device=device)
        self.t5_ids = torch.randint(1, 90 if tiny else 32000, (1, self.t.max_sequence_length), device=device)
        self.noise = torch.randn((1, *self.t.latent_shape), generator=torch.Generator().manual_seed(0)).to(device)

    def encode(self):
        hidden = self.t5(self.t5_ids)[0]
        outs = [c(self.clip_ids, output_hidden_states=True) for c in self.clips]
        pooled = torch.cat([o.text_embeds for o in outs], dim=-1)
        if self.name != "flux":  # SD3: the CLIPs' penultimate states side by side, zero-padded, then T5's
            clip = torch.cat([o.hidden_states[-2] for o in outs], dim=-1)
            clip = torch.nn.functional.pad(clip, (0, hidden.shape[-1] - clip.shape[-1]))
            hidden = torch.cat([clip, hidden], dim=-2)
        return self.cond_cls(hidden.to(self.t.dtype), {"pooled_projections": pooled.to(self.t.dtype)})

    def __call__(self, steps: int) -> torch.Tensor:
        from hypersd.core.sampling import sample_tcd

        t = self.t
        cond = self.encode()
        timesteps = inference_timesteps(steps, t.T, spacing=t.schedule.spacing)
        with self.lora.fused(t.unet):  # merged into bf16 weights; left beside quantized ones
            x = sample_tcd(lambda x, s: t.eps(x, s, cond), self.noise, timesteps, t.schedule)
        return self.vae.decode(x.to(t.dtype) / self.vae.config.scaling_factor).sample.clamp(-1, 1)


@torch.no_grad()
def flow_rows(a, record, device, dtype) -> None:
    """Each flow model per option (bf16 with the LoRA fused; quantized with the LoRA beside)."""
    from hypersd.errors import HypersdError

    cuda = device.type == "cuda"
    for name in a.flow_models:
        ref = {}
        for option in a.flow_options:
            kind = "none" if option == "bf16" else option
            if cuda:
                torch.cuda.empty_cache()
            before = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
            try:
                p = FlowPipeline(name, device, dtype, a.tiny, kind)
            except HypersdError as e:
                record({"model": name, "steps": "", "variant": option, "error": str(e)})
                continue
            resident = round(torch.cuda.memory_allocated() / 2**30 - before, 2) if cuda else float("nan")
            _time_flow(p, a, record, ref, option, resident)
            p = None  # freed before the next option's weights are built


def _time_flow(p: FlowPipeline, a, record, ref: dict, option: str, resident: float) -> None:
    for k in [int(s) for s in a.steps.split(",")]:
        image = p(k).float()
        ref.setdefault(k, image)  # the first option's (bf16) image is the reference
        ms = 1000 * timed(lambda k=k: p(k), 1, a.iters, p.t.device)[0]
        record({"model": p.name, "steps": k, "variant": option, "ms": round(ms, 2),
                "max_abs_diff": (image - ref[k]).abs().max().item(), "resident_gib": resident})


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--steps", default="1,4")
    p.add_argument("--iters", type=int, default=20)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--budget", type=float, default=240, help="seconds; compile parts are skipped past it")
    p.add_argument("--compile-reserve", type=float, default=60)
    p.add_argument("--tiny", "--dry", action="store_true")
    p.add_argument("--flow-models", default="", help="any of sd3, sd35-large, flux (comma-separated)")
    p.add_argument("--flow-options", default="bf16,int8,nf4", help="the transformer's weights: bf16, int8, fp8, nf4")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.flow_models = [m for m in a.flow_models.split(",") if m]
    a.flow_options = [o for o in a.flow_options.split(",") if o]
    return run(a)


if __name__ == "__main__":
    main()
