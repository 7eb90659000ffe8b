"""A CFG LoRA (hypersd distill with cfg: preserve) through hypersd generate: its guidance, two passes a step."""

import torch
from random_lora import save_random_lora
from sd_tiny import save_tiny

from hypersd.core.sampling import sample_prompts
from hypersd.inference.generator import Generator
from hypersd.teachers import load_teacher


def test_a_cfg_lora_is_sampled_at_its_guidance_with_two_passes_a_step(tmp_path):
    model = str(save_tiny("sd15", tmp_path / "sd15"))
    teacher = load_teacher("sd15", model)
    path = save_random_lora(teacher.unet, tmp_path / "lora.safetensors",
                            {"kind": "hypersd-lora", "cfg": "preserve", "guidance": 5.0, "backbone": "sd15"})

    gen = Generator(model, str(path), steps=2, device="cpu")
    assert (gen.plan.guidance, gen.plan.passes, gen.plan.cfg) == (5.0, 2, "preserve")
    rows = []
    gen.pipe.unet.register_forward_pre_hook(lambda module, args: rows.append(len(args[0])))
    images = gen.images(["a cat"], [3])
    assert rows == [2, 2]  # two steps, each on the conditional and the unconditional row
    with torch.no_grad():
        want = teacher.decode(sample_prompts(teacher, ["a cat"], 2, guidance=5.0, seed=3))
    torch.testing.assert_close(images, want, atol=1e-4, rtol=0)  # hypersd's own CFG sampler, LoRA on

    negative = Generator(model, str(path), steps=2, negative_prompt="a dog", device="cpu").images(["a cat"], [3])
    assert (negative - images).abs().max() > 1e-3  # the negative prompt takes the unconditional pass
