"""The groundwork of sharding the frozen base (docs/MEMORY.md, "Many GPUs"): FSDP2 on two CPU
processes (gloo) shards a tiny FLUX teacher's blocks with the LoRA weights left out of the shards,
and hypersd's adapter switches (the teacher pass with adapters off, another adapter added after
sharding, as a stage adds its EMA target) work on it, with the LoRA's gradients unchanged.
The trainer's ``shard_base`` builds on this (tests/train/test_shard.py)."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

WORKER = r'''
import sys, torch, torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh
from torch.distributed.fsdp import fully_shard
from test_quant import _inputs, _randomize_lora, _student, lora_grads, make_teacher
from hypersd import lora

dist.init_process_group("gloo")
t = make_teacher("flux")
x, s, cond = _inputs(t)
_student(t)
_randomize_lora(t)
params = lora.adapter_params(t.unet, lora.STUDENT)

def loss():
    with lora.adapters_disabled(t.unet), torch.no_grad():
        teacher = t.eps(x, s, cond)
    return (t.eps(x, s, cond) - teacher).pow(2).mean()

def grads():
    return lora_grads(t, loss)

plain = grads()
mesh = init_device_mesh("cpu", (dist.get_world_size(),))
ignored = {p for n, p in t.unet.named_parameters() if "lora_" in n}
for block in [*t.unet.transformer_blocks, *t.unet.single_transformer_blocks]:
    fully_shard(block, mesh=mesh, ignored_params=ignored)
fully_shard(t.unet, mesh=mesh, ignored_params=ignored)
sharded = sum(type(p).__name__ == "DTensor" for p in t.unet.parameters())
same = all(torch.allclose(a, b, atol=1e-6) for a, b in zip(plain, grads()))
lora_plain = all(type(p) is torch.nn.Parameter for p in params)
lora.ensure_lora(t.unet, lora.EMA, **lora.spec(t.unet, lora.STUDENT))
with lora.adapter(t.unet, lora.EMA), torch.no_grad():
    ema = t.eps(x, s, cond)
print(f"RESULT rank={dist.get_rank()} sharded={sharded} same={same} lora_plain={lora_plain} "
      f"ema_finite={bool(torch.isfinite(ema).all())}")
dist.destroy_process_group()
'''


@pytest.mark.slow
def test_fsdp2_shards_the_frozen_base_and_leaves_the_lora_and_its_switches_as_they_are(tmp_path):
    root = Path(__file__).resolve().parents[2]
    worker = tmp_path / "worker.py"
    worker.write_text(WORKER)
    paths = [str(root / "src"), str(root / "tests"), str(root / "tests" / "nets")]
    env = os.environ | {"OMP_NUM_THREADS": "1", "PYTHONPATH": os.pathsep.join(paths)}
    done = subprocess.run([sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", str(worker)],
                          capture_output=True, text=True, env=env, timeout=300, check=False)
    assert done.returncode == 0, done.stdout[-2000:] + "\n---\n" + done.stderr[-3000:]
    results = sorted(line for line in done.stdout.splitlines() if line.startswith("RESULT"))
    assert len(results) == 2
    for line in results:
        fields = dict(kv.split("=") for kv in line.split()[1:])
        assert int(fields["sharded"]) > 0 and fields["same"] == "True"
        assert fields["lora_plain"] == "True" and fields["ema_finite"] == "True"
