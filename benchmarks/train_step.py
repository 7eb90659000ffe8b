"""Time one distillation training step at real scale: the usual LoRA step against hypersd's.

SD1.5 (512 px, batch 16) and SDXL (1024 px, batch 4), UNets of the real architectures with
random weights (compute does not depend on weight values), a rank-64 LoRA on attention,
feed-forward and resnet convolutions, bf16 autocast with float32 LoRA weights, latents and text
embeddings given (as a latent cache gives them: no VAE or text encoder in the step).

  reference   the LoRA consistency step as it is usually written: one UNet, the teacher with
              adapters disabled, its conditional and unconditional passes as two calls, the student
              forward and backward, a target forward; eager, default layout, foreach AdamW
  tscd        hypersd's TSCD stage (stages.TSCDRun + the trainer's step), eager
  tscd-adv    the same with the adversarial term (frozen-encoder discriminator, its heads' update)
  dmd         hypersd's one-step DMD stage (fake-score LoRA, its updates, regulariser, keep term)
  *+fp8       the same with the teacher passes' linear layers in FP8 (fp8.enable; GPUs of
              compute capability 8.9+, and the CPU's emulation with --tiny)
  *+compile   the same with the UNet's repeated blocks compiled (speed.compile_blocks)

Prints samples/s, the ratio to the reference, peak GiB, and achieved TFLOP/s (FLOPs of one step
from torch's flop counter, over the step's median time). Then the memory checks: an SDXL TSCD
step with the adversarial term at batch 1 and a DMD step at batch 2, with gradient checkpointing;
with ``--options``, the TSCD + adversarial step's peak as each memory option is added (float32,
bf16, + gradient checkpointing, + 8-bit AdamW).

SD3-medium, SD3.5-large and FLUX.1-dev (``--flow-models``; 1024 px, batch 1, rank-64 LoRA on the
transformer preset, bf16): hypersd's TSCD and DMD steps under each ``--flow-options`` entry, a
quantized base (bf16, int8, fp8, nf4: run.quantize_base) with or without gradient checkpointing
(``+ckpt``), with the resident GiB (weights and LoRA before the step) beside the step's peak.

  python benchmarks/train_step.py [--models sd15,sdxl] [--budget 420] [--json out.json]
  python benchmarks/train_step.py --models '' --flow-models flux --flow-options bf16+ckpt,nf4+ckpt
  python benchmarks/train_step.py --tiny      # a CPU smoke run on tiny UNets (also --dry)
  python benchmarks/train_step.py --dry --models '' --flow-models sd3,flux   # the same on tiny transformers
  python benchmarks/train_step.py --flop-split   # where a forward's FLOPs go (meta device, seconds)
"""

from __future__ import annotations

import argparse
import gc
import json
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "src"))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from timing import timed  # noqa: E402

from hypersd import lora  # noqa: E402
from hypersd.core.schedule import SolverGrid  # noqa: E402
from hypersd.core.solver import add_noise, cfg, ddim_jump  # noqa: E402
from hypersd.errors import HypersdError  # noqa: E402
from hypersd.nets import archs, fp8, quant, speed
from hypersd.teachers.base import Cond, Teacher  # noqa: E402
from hypersd.train.context import StageContext  # noqa: E402
from hypersd.train.recipe import DMDStage, TSCDStage  # noqa: E402
from hypersd.train.runtime import Runtime  # noqa: E402
from hypersd.train.stages import DMDRun, TSCDRun  # noqa: E402
from hypersd.train.trainer import train_step  # noqa: E402

RANK = 64
TARGETS = ["to_q", "to_k", "to_v", "to_out.0", "ff.net.0.proj", "ff.net.2", "conv1", "conv2", "conv_shortcut"]
SETUPS = {"sd15": {"batch": 16, "guidance": 7.5}, "sdxl": {"batch": 4, "guidance": 5.0}}
TINY = dict(block_out_channels=(32, 64), attention_head_dim=(2, 4), layers_per_block=1, sample_size=16,
            down_block_types=("DownBlock2D", "CrossAttnDownBlock2D"),
            up_block_types=("CrossAttnUpBlock2D", "UpBlock2D"))


class RandomTeacher(Teacher):
    """A teacher whose prompts are already embeddings (random, of the real shapes)."""

    def __init__(self, backbone: str, unet, guidance: float):
        self.backbone, self.unet, self.default_guidance = backbone, unet, guidance
        self.alphas_cumprod = archs.alphas_cumprod()
        size = unet.config.sample_size
        self.latent_shape = (4, size, size)
        self.dim = unet.config.cross_attention_dim

    def encode_prompt(self, prompts) -> Cond:
        n, dev = len(prompts), self.device
        added = {}
        if self.backbone == "sdxl":
            pooled = self.unet.config.projection_class_embeddings_input_dim - 6 * self.unet.config.addition_time_embed_dim
            added = {"text_embeds": torch.randn(n, pooled, device=dev),
                     "time_ids": torch.tensor([[1024.0, 1024, 0, 0, 1024, 1024]], device=dev).expand(n, 6)}
        return Cond(torch.randn(n, archs.TOKENS, self.dim, device=dev), added)


class RandomData:
    def __init__(self, teacher: RandomTeacher):
        self.teacher = teacher

    def batch(self, n, generator):
        z = torch.randn((n, *self.teacher.latent_shape), generator=generator).to(self.teacher.device)
        return z, ["a prompt"] * n


def distiller(teacher, stage, precision: str | None = None) -> StageContext:
    """What a stage sees of the trainer (its StageContext)."""
    precision = precision or ("bf16" if teacher.device.type == "cuda" else "no")
    return StageContext(teacher, torch.Generator().manual_seed(0), teacher.encode_prompt([""]),
                        Runtime(teacher.device, precision),
                        batch=lambda n, g=None: (*RandomData(teacher).batch(n, g or torch.Generator()),
                                                 teacher.encode_prompt(["p"] * n)),
                        seed=0, stages=[stage], lora_rank=RANK, lora_alpha=RANK, grad_clip=1.0)


def hypersd_step(run, opt, z, prompts, cond):
    """One step of hypersd's trainer loop (trainer.train_step), without its files."""
    train_step(run.ctx.rt, run, opt, z, prompts, cond, grad_clip=1.0)


class ReferenceStep:
    """The LoRA consistency step as usually written (an LCM-LoRA style training script)."""

    def __init__(self, teacher: RandomTeacher, guidance: float):
        self.t, self.unet, self.w = teacher, teacher.unet, guidance
        self.params = lora.adapter_params(self.unet, lora.STUDENT)
        self.opt = torch.optim.AdamW(self.params, lr=1e-4)  # foreach, the default
        self.grid = SolverGrid(teacher.T, 40)
        self.acp = teacher.alphas_cumprod.to(teacher.device)

    def __call__(self, z, cond: Cond, uncond: Cond):
        unet, acp, n = self.unet, self.acp, len(z)
        t = self.grid.sample(n).to(z.device)
        t_prev = self.grid.step_down(t.cpu()).clamp(min=0).to(z.device)
        x_t = add_noise(z, torch.randn_like(z), t, acp)
        kw = lambda c: {"added_cond_kwargs": c.added} if c.added else {}  # noqa: E731
        with autocast(z.device):
            pred = unet(x_t, t, encoder_hidden_states=cond.hidden, **kw(cond)).sample
        pred_x0 = ddim_jump(x_t, pred, t, -1, acp)
        with torch.no_grad(), autocast(z.device):
            unet.disable_adapters()
            e_c = unet(x_t, t, encoder_hidden_states=cond.hidden, **kw(cond)).sample
            e_u = unet(x_t, t, encoder_hidden_states=uncond.hidden, **kw(uncond)).sample
            unet.enable_adapters()
            x_prev = ddim_jump(x_t, cfg(e_c, e_u, self.w), t, t_prev, acp)
            e_tgt = unet(x_prev, t_prev, encoder_hidden_states=cond.hidden, **kw(cond)).sample
            target = ddim_jump(x_prev, e_tgt, t_prev, -1, acp)
        loss = torch.nn.functional.mse_loss(pred_x0.float(), target.float())
        loss.backward()
        torch.nn.utils.clip_grad_norm_(self.params, 1.0)
        self.opt.step()
        self.opt.zero_grad(set_to_none=True)


def flops(fn) -> float:
    from torch.utils.flop_counter import FlopCounterMode

    with FlopCounterMode(display=False) as counter:
        fn()
    return float(counter.get_total_flops())


# how torch's flop counter names what a UNet forward spends its FLOPs on
OP_KINDS = {"aten.addmm": "linear", "aten.mm": "linear", "aten.convolution": "conv", "aten.bmm": "attention",
            "aten._scaled_dot_product_efficient_attention": "attention",
            "aten._scaled_dot_product_flash_attention": "attention",
            "aten._scaled_dot_product_cudnn_attention": "attention"}


def flop_split(backbone: str, tiny: bool) -> dict:
    """Shares of one batch-1 UNet forward's FLOPs: linear layers (what FP8 teacher passes run in
    FP8), convolutions, attention. On the meta device: shapes only, so it takes seconds on a CPU."""
    from collections import Counter

    from torch.utils.flop_counter import FlopCounterMode

    teacher, _ = build(backbone, torch.device("meta"), tiny, 1, with_lora=False)
    z = torch.zeros((1, *teacher.latent_shape), device="meta")
    with torch.no_grad(), FlopCounterMode(display=False) as counter:
        teacher.eps(z, torch.full((1,), 500, device="meta"), teacher.encode_prompt(["p"]))
    kinds = Counter()
    for op, n in counter.get_flop_counts()["Global"].items():
        kinds[OP_KINDS.get(str(op), "other")] += n
    total = sum(kinds.values())
    return {"model": backbone, "variant": "flop split (batch-1 forward)", "tflop_forward": round(total / 1e12, 3),
            **{k: round(kinds[k] / total, 3) for k in ("linear", "conv", "attention", "other")}}


def build(backbone: str, device, tiny: bool, batch: int | None, dtype=None, with_lora: bool = True):
    overrides = TINY if tiny else {}
    if tiny and backbone == "sdxl":
        overrides = TINY | dict(transformer_layers_per_block=(1, 2), addition_time_embed_dim=8,
                                projection_class_embeddings_input_dim=6 * 8 + 32, cross_attention_dim=64)
    if tiny and backbone == "sd15":
        overrides = TINY | dict(cross_attention_dim=32)
    torch.manual_seed(0)
    dtype = dtype or (torch.bfloat16 if device.type == "cuda" else torch.float32)
    unet = archs.unet(backbone, device=device, dtype=dtype, **overrides)
    if with_lora:
        lora.add_lora(unet, lora.lora_config(RANK if not tiny else 4, None, TARGETS), lora.STUDENT)
        lora.activate(unet, lora.STUDENT, trainable=(lora.STUDENT,))
    setup = SETUPS[backbone]
    teacher = RandomTeacher(backbone, unet, setup["guidance"])
    return teacher, (batch or (2 if tiny else setup["batch"]))


def stage_for(kind: str, batch: int):
    if kind in ("tscd", "tscd-adv"):
        return TSCDStage(name=kind, segments=4, batch=batch, lr=1e-4, adv_weight=0.1 if kind == "tscd-adv" else 0.0)
    quarter = max(1, batch // 4)
    return DMDStage(name="dmd", batch=batch, lr=1e-4, fake_warmup=0, reg_pool=4 * quarter, reg_steps=4,
                    reg_batch=quarter, keep_weight=1.0, keep_batch=quarter)


def autocast(device):
    return torch.autocast(device.type, dtype=torch.bfloat16, enabled=device.type == "cuda")


class Bench:
    def __init__(self, args, device):
        self.a, self.device, self.rows = args, device, []
        self.t0 = time.perf_counter()

    def left(self) -> float:
        return self.a.budget - (time.perf_counter() - self.t0)

    def record(self, row: dict) -> None:
        self.rows.append(row)
        print(json.dumps(row), flush=True)
        self.save()

    def save(self) -> None:
        if self.a.json:
            Path(self.a.json).write_text(json.dumps(self.rows, indent=1))

    def measure(self, model, variant, batch, fn, flop_fn=None, note="", same_flops_as=None, reps=None):
        """``same_flops_as``: a row of the same step run another way (compiled, FP8), whose count is reused.
        ``reps``: (warmup, iters) where only the peak matters (the second step holds the optimizer state)."""
        warmup, iters = (1, 2) if self.a.tiny else (reps or (self.a.warmup, self.a.iters))
        t_first = time.perf_counter()
        sec, peak = timed(fn, warmup, iters, self.device)
        if same_flops_as is not None:
            n_flops = same_flops_as["tflop_per_step"] * 1e12
        else:
            n_flops = flops(flop_fn or fn) if (self.a.flops and "compile" not in variant) else float("nan")
        row = {"model": model, "variant": variant, "batch": batch, "step_ms": round(1000 * sec, 1),
               "samples_per_s": round(batch / sec, 2), "peak_gib": round(peak, 2),
               "tflop_per_step": round(n_flops / 1e12, 2), "tflops": round(n_flops / sec / 1e12, 1),
               "wall_s": round(time.perf_counter() - t_first, 1), "note": note}
        self.record(row)
        return row


def run_model(b: Bench, backbone: str):
    """Eager: the reference, then hypersd's stages; returns what the compiled pass reuses."""
    a, dev = b.a, b.device
    teacher, batch = build(backbone, dev, a.tiny, None)
    unet = teacher.unet
    g = torch.Generator().manual_seed(1)
    z = torch.randn((batch, *teacher.latent_shape), generator=g).to(dev)
    cond, uncond = teacher.encode_prompt(["p"] * batch), teacher.encode_prompt([""] * batch)
    prompts = ["p"] * batch

    ref = ReferenceStep(teacher, SETUPS[backbone]["guidance"])
    base = b.measure(backbone, "reference", batch, lambda ref=ref: ref(z, cond, uncond),
                     note="two teacher calls, eager, default layout, foreach AdamW")
    del ref

    speed.channels_last(unet)
    runs, rows = {}, {}
    for kind in a.variants:
        if b.left() < 0:
            break
        stage = stage_for(kind, batch)
        with autocast(dev):
            run = (DMDRun if kind == "dmd" else TSCDRun)(distiller(teacher, stage), stage)
            run.enter(fresh=True)
        opt = speed.optimizer(run.params, stage.lr)
        runs[kind] = step = lambda run=run, opt=opt: hypersd_step(run, opt, z, prompts, cond)  # noqa: E731
        rows[kind] = row = b.measure(backbone, kind, batch, step, note="channels-last, batched CFG, fused AdamW")
        row["vs_reference"] = round(row["samples_per_s"] / base["samples_per_s"], 2)
        b.save()
    state = {"backbone": backbone, "unet": unet, "runs": runs, "rows": rows, "base": base, "batch": batch}
    fp8_rows(b, state, "")
    return state


def fp8_rows(b: Bench, state: dict, suffix: str) -> None:
    """FP8 teacher passes on the steps measured so far (then back to plain layers)."""
    kinds = [k for k in b.a.fp8_variants if k in state["runs"]]
    if not kinds or b.left() < 0:
        return
    try:
        n = fp8.enable(state["unet"])
    except HypersdError as e:  # a GPU without FP8 units: say so, measure the rest
        b.record({"model": state["backbone"], "variant": "fp8", "batch": state["batch"], "error": str(e)})
        return
    for kind in kinds:
        if b.left() < 0:
            break
        row = b.measure(state["backbone"], f"{kind}+fp8{suffix}", state["batch"], state["runs"][kind],
                        note=f"{n} teacher linear layers in FP8", same_flops_as=state["rows"].get(kind))
        row["vs_reference"] = round(row["samples_per_s"] / state["base"]["samples_per_s"], 2)
        b.save()
    fp8.disable(state["unet"])


def run_compiled(b: Bench, state: dict):
    backbone, base, batch = state["backbone"], state["base"], state["batch"]
    if b.left() < b.a.compile_reserve:
        print(f"  {backbone}: compile skipped ({b.left():.0f} s left)", flush=True)
        return
    t_c = time.perf_counter()
    n = speed.compile_blocks(state["unet"])
    for kind, step in state["runs"].items():
        if b.left() < b.a.compile_reserve / 2:
            print(f"  {backbone}: {kind}+compile skipped ({b.left():.0f} s left)", flush=True)
            break
        row = b.measure(backbone, kind + "+compile", batch, step, note=f"{n} blocks compiled",
                        same_flops_as=state["rows"].get(kind))
        row["vs_reference"] = round(row["samples_per_s"] / base["samples_per_s"], 2)
        row["compile_and_warmup_s"] = round(time.perf_counter() - t_c, 1)
        b.save()
        t_c = time.perf_counter()
    if b.left() > b.a.compile_reserve / 2:
        fp8_rows(b, state, "+compile")


def memory_row(b: Bench, kind: str, batch: int, variant: str, note: str, *, dtype=None, precision=None,
               checkpointing: bool = True, optimizer: str = "adamw", reps=None) -> dict:
    """One SDXL 1024 px step on a UNet built for it, its peak counted above what was allocated
    before (so models the benchmark still holds do not count)."""
    cuda = b.device.type == "cuda"
    gc.collect()  # the previous row's UNet (peft modules hold reference cycles), before the baseline
    if cuda:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    teacher, batch = build("sdxl", b.device, b.a.tiny, batch, dtype)
    if checkpointing:
        speed.gradient_checkpointing(teacher.unet)
    speed.channels_last(teacher.unet)
    z = torch.randn((batch, *teacher.latent_shape)).to(b.device)
    cond = teacher.encode_prompt(["p"] * batch)
    stage = stage_for(kind, batch)
    d = distiller(teacher, stage, precision)
    with d.rt.autocast():
        run = (DMDRun if kind == "dmd" else TSCDRun)(d, stage)
        run.enter(fresh=True)
    opt = speed.optimizer(run.params, stage.lr, optimizer)
    row = b.measure("sdxl", variant, batch, lambda: hypersd_step(run, opt, z, ["p"] * batch, cond), note=note,
                    reps=reps)
    row["peak_gib"] = round(row["peak_gib"] - before, 2)
    b.save()
    return row


def memory_checks(b: Bench):
    """SDXL at 1024 px: TSCD + adversarial at batch 1, DMD at batch 2, gradient checkpointing on."""
    for kind, batch, limit in (("tscd-adv", 1, 24), ("dmd", 2, 40)):
        if b.left() < 30:
            print(f"  memory check {kind} skipped ({b.left():.0f} s left)")
            return
        row = memory_row(b, kind, batch, f"{kind} memory", f"gradient checkpointing; goal peak < {limit} GiB")
        row["fits"] = bool(row["peak_gib"] < limit)
        b.save()
        print(f"  sdxl {kind} batch {batch}: peak {row['peak_gib']} GiB (goal < {limit})", flush=True)


# Each memory option added to the one before, on an SDXL TSCD + adversarial step at batch 1:
# (name, UNet dtype, mixed precision, gradient checkpointing, optimizer)
OPTION_LADDER = (
    ("float32", torch.float32, "no", False, "adamw"),
    ("bf16", torch.bfloat16, "bf16", False, "adamw"),
    ("bf16 + checkpointing", torch.bfloat16, "bf16", True, "adamw"),
    ("bf16 + checkpointing + adamw8bit", torch.bfloat16, "bf16", True, "adamw8bit"),
)


def memory_options(b: Bench):
    """The peak memory of each option (docs/SPEED.md), one added after another."""
    for name, dtype, precision, checkpointing, optimizer in OPTION_LADDER:
        if b.left() < 30:
            print(f"  option {name} skipped ({b.left():.0f} s left)")
            return
        try:
            row = memory_row(b, "tscd-adv", 1, f"tscd-adv options: {name}", name, dtype=dtype, precision=precision,
                             checkpointing=checkpointing, optimizer=optimizer, reps=(1, 1))
        except HypersdError as e:  # adamw8bit without bitsandbytes: say so, measure the rest
            b.record({"model": "sdxl", "variant": f"tscd-adv options: {name}", "batch": 1, "error": str(e)})
            continue
        print(f"  sdxl tscd-adv batch 1, {name}: peak {row['peak_gib']} GiB", flush=True)


FLOW_OPTIONS = "bf16,bf16+ckpt,int8+ckpt,nf4+ckpt"


def flow_stage(kind: str, teacher, batch: int):
    """The TSCD or DMD stage of a flow teacher (its own grid: SD3's T = 841, FLUX's 1200)."""
    from flow_models import SOLVER_STEPS

    solver = 43 if teacher.T == 841 else SOLVER_STEPS["flux"]
    if kind == "tscd":
        return TSCDStage(name="tscd", segments=4, batch=batch, lr=1e-4, solver_steps=solver)
    last = teacher.T - 1
    return DMDStage(name="dmd", batch=batch, lr=1e-4, fake_warmup=0, generator_t=last, t_range=[20, last - 20],
                    reg_pool=4, reg_steps=4, reg_batch=1, keep_weight=1.0, keep_batch=1)


def flow_row(b: Bench, name: str, option: str, kind: str) -> None:
    """One flow model's step under one option: its own freshly built (and quantized) transformer."""
    from flow_models import flow_teacher

    qkind, _, extra = option.partition("+")
    qkind = "none" if qkind == "bf16" else qkind
    cuda = b.device.type == "cuda"
    dtype = torch.bfloat16 if cuda else torch.float32
    gc.collect()
    if cuda:
        torch.cuda.empty_cache()
    before = torch.cuda.memory_allocated() / 2**30 if cuda else 0.0
    variant = f"{kind} {option}"
    try:
        teacher = flow_teacher(name, b.device, dtype, tiny=b.a.tiny, quantize=qkind)
    except HypersdError as e:  # a quantization package missing here: say so, measure the rest
        b.record({"model": name, "variant": variant, "batch": 1, "error": str(e)})
        return
    unet = teacher.unet
    lora.add_lora(unet, lora.lora_config(4 if b.a.tiny else RANK, None, "transformer"), lora.STUDENT)
    lora.activate(unet, lora.STUDENT, trainable=(lora.STUDENT,))
    if qkind != "none":
        quant.check_wrapped(unet)
    if extra == "ckpt":
        speed.gradient_checkpointing(unet)
    z = torch.randn((1, *teacher.latent_shape)).to(b.device)
    cond = teacher.encode_prompt(["p"])
    stage = flow_stage(kind, teacher, 1)
    d = distiller(teacher, stage, "bf16" if cuda else "no")
    with d.rt.autocast():
        run = (DMDRun if kind == "dmd" else TSCDRun)(d, stage)
        run.enter(fresh=True)
    opt = speed.optimizer(run.params, stage.lr)
    resident = torch.cuda.memory_allocated() / 2**30 - before if cuda else float("nan")
    note = f"{quant.BYTES_PER_WEIGHT[qkind]:.2f} B/linear weight" + (", gradient checkpointing" if extra else "")
    row = b.measure(name, variant, 1, lambda: hypersd_step(run, opt, z, ["p"], cond), note=note, reps=(1, 2))
    row["peak_gib"] = round(row["peak_gib"] - before, 2)
    row["resident_gib"] = round(resident, 2)
    b.save()


def flow_rows(b: Bench) -> None:
    for name in b.a.flow_models:
        for option in b.a.flow_options:
            for kind in b.a.flow_variants:
                if b.left() < 30:
                    print(f"  {name} {kind} {option} skipped ({b.left():.0f} s left)", flush=True)
                    return
                flow_row(b, name, option, kind)


def main(argv=None):
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--models", default="sd15,sdxl")
    p.add_argument("--variants", default="tscd,tscd-adv,dmd")
    p.add_argument("--fp8-variants", default="tscd", help="steps also timed with FP8 teacher passes ('' for none)")
    p.add_argument("--warmup", type=int, default=2)
    p.add_argument("--iters", type=int, default=5)
    p.add_argument("--no-compile", dest="compile", action="store_false")
    p.add_argument("--no-flops", dest="flops", action="store_false")
    p.add_argument("--no-memory", dest="memory", action="store_false")
    p.add_argument("--options", action="store_true",
                   help="also the peak memory of each memory option on an SDXL TSCD + adversarial step at batch 1")
    p.add_argument("--budget", type=float, default=420, help="seconds; later parts are skipped past it")
    p.add_argument("--compile-reserve", type=float, default=90, help="seconds a model's compile parts need")
    p.add_argument("--tiny", "--dry", action="store_true",
                   help="tiny UNets and transformers: a CPU rehearsal that every step runs")
    p.add_argument("--flow-models", default="", help="any of sd3, sd35-large, flux (comma-separated)")
    p.add_argument("--flow-options", default=FLOW_OPTIONS,
                   help="quantize_base (bf16, int8, fp8, nf4), each with +ckpt for gradient checkpointing")
    p.add_argument("--flow-variants", default="tscd,dmd")
    p.add_argument("--flop-split", action="store_true",
                   help="only print where a UNet forward's FLOPs go (linear / conv / attention); no GPU needed")
    p.add_argument("--json", default=None)
    a = p.parse_args(argv)
    a.variants = [v for v in a.variants.split(",") if v]
    a.fp8_variants = [v for v in a.fp8_variants.split(",") if v]
    a.flow_models = [m for m in a.flow_models.split(",") if m]
    a.flow_options = [o for o in a.flow_options.split(",") if o]
    a.flow_variants = [v for v in a.flow_variants.split(",") if v]
    if a.flop_split:
        rows = [flop_split(m, a.tiny) for m in a.models.split(",")]
        print("| model | TFLOP / forward | linear | conv | attention | other |\n|---|---|---|---|---|---|")
        for r in rows:
            print(f"| {r['model']} | {r['tflop_forward']} | {r['linear']} | {r['conv']} | {r['attention']} | {r['other']} |")
        return rows
    device = torch.device("cuda" if torch.cuda.is_available() and not a.tiny else "cpu")
    if device.type == "cuda":
        speed.enable_tf32()
        print(f"# {torch.cuda.get_device_name()} | torch {torch.__version__} | {time.strftime('%Y-%m-%d')}")
    b = Bench(a, device)
    # cheap first: every eager number and the memory checks, then what compiling adds
    states = [run_model(b, backbone) for backbone in a.models.split(",") if backbone]
    flow_rows(b)
    if a.memory:
        memory_checks(b)
    if a.options:
        memory_options(b)
    if a.compile:
        for state in states:
            run_compiled(b, state)
    print("\n| model | variant | batch | samples/s | vs reference | resident GiB | peak GiB | TFLOP/step | TFLOP/s |")
    print("|---|---|---|---|---|---|---|---|---|")
    for r in (r for r in b.rows if "error" not in r):
        print(f"| {r['model']} | {r['variant']} | {r['batch']} | {r['samples_per_s']} | {r.get('vs_reference', '')} "
              f"| {r.get('resident_gib', '')} | {r['peak_gib']} | {r['tflop_per_step']} | {r['tflops']} |")
    for r in (r for r in b.rows if "error" in r):
        print(f"| {r['model']} | {r['variant']} | error: {r['error'][:120]} |")
    return b.rows


if __name__ == "__main__":
    main()
