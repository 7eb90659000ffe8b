"""The embedded digits teacher: a diffusers UNet2DConditionModel on 8x8 pixels.

Pixel space, so encode/decode are the identity. Weights and configs live in one safetensors file
(configs in its metadata), shipped in the package.
"""

from __future__ import annotations

import json
from pathlib import Path

import torch
from diffusers import UNet2DConditionModel
from safetensors.torch import load_file, save_file

from hypersd.core.noise import DDPMSchedule
from hypersd.digits import ASSETS
from hypersd.digits.text import DigitTextEncoder, tokenize
from hypersd.errors import HypersdError
from hypersd.teachers.base import Cond, Teacher

DEFAULT_PATH = ASSETS / "teacher.safetensors"

UNET_CONFIG = {
    "sample_size": 8,
    "in_channels": 1,
    "out_channels": 1,
    "block_out_channels": [32, 64, 64],
    "down_block_types": ["DownBlock2D", "CrossAttnDownBlock2D", "CrossAttnDownBlock2D"],
    "up_block_types": ["CrossAttnUpBlock2D", "CrossAttnUpBlock2D", "UpBlock2D"],
    "layers_per_block": 1,
    "cross_attention_dim": 64,
    "attention_head_dim": 8,
    "norm_num_groups": 8,
}
# SD1.5's schedule: 1,000 steps, scaled_linear 0.00085 to 0.012, ε-prediction.
SCHEDULER_CONFIG = {
    "num_train_timesteps": 1000,
    "beta_start": 0.00085,
    "beta_end": 0.012,
    "beta_schedule": "scaled_linear",
    "prediction_type": "epsilon",
}


class DigitsWorldTeacher(Teacher):
    """What every digits-world teacher shares: one safetensors file (configs in its metadata), the
    word-level ``DigitTextEncoder`` and the identity pixel codec. Subclasses name the network
    (``NET_KEY``: its metadata key and weight prefix) and how its schedule is built."""

    latent_shape = (1, 8, 8)
    KIND: str
    LABEL: str
    NET_KEY: str
    NET_CONFIG: dict
    SCHEDULE_CONFIG: dict
    DEFAULT_PATH: Path

    def __init__(self, unet, text, scheduler_config: dict, default_guidance: float = 1.0, info=None):
        self.unet, self.text = unet, text  # ``unet``: the attribute every stage puts its LoRA on
        self.scheduler_config = dict(scheduler_config)
        self._init_schedule()
        self.default_guidance = float(default_guidance)
        self.info = dict(info or {})
        self.fingerprint: str | None = None  # digest of the file it was loaded from

    def _init_schedule(self) -> None:
        raise NotImplementedError

    @classmethod
    def build_network(cls, config: dict) -> torch.nn.Module:
        raise NotImplementedError

    @classmethod
    def new(cls, seed: int = 0):
        torch.manual_seed(seed)
        return cls(cls.build_network(cls.NET_CONFIG), DigitTextEncoder(), cls.SCHEDULE_CONFIG)

    @classmethod
    def load(cls, path: str | Path | None = None, device="cpu"):
        path = Path(path) if path else cls.DEFAULT_PATH
        if not path.is_file():
            hint = (
                f"the package's shipped {cls.LABEL} is missing: reinstall hypersd, or train one with "
                f"'hypersd teacher train'" if path == cls.DEFAULT_PATH else "pass an existing teacher file"
            )
            raise HypersdError(f"{cls.LABEL} file {path} not found; {hint}")
        from hypersd.outputs import read_metadata

        meta = read_metadata(path, cls.LABEL)
        if not meta or meta.get("kind") != cls.KIND:
            found = f"a {meta['kind']!r} file" if meta and meta.get("kind") else "no teacher metadata"
            raise HypersdError(f"{path} is not a hypersd {cls.LABEL} file ({found}; expected kind "
                               f"{cls.KIND!r}): pass a file 'hypersd teacher train' wrote for this backbone")
        net = cls.build_network(meta[cls.NET_KEY])
        text = DigitTextEncoder(**meta["text"])
        state = load_file(str(path))
        _load_part(net, state, f"{cls.NET_KEY}.", path)
        _load_part(text, state, "text.", path)
        t = cls(net.eval().requires_grad_(False), text.eval().requires_grad_(False),
                meta["scheduler"], meta.get("default_guidance", 1.0), meta.get("info"))
        t.unet.to(device)
        t.text.to(device)
        t.fingerprint = _file_digest(path)
        return t

    def save(self, path: str | Path) -> None:
        from hypersd.outputs import atomic_path

        state = {f"{self.NET_KEY}.{k}": v.detach().cpu().contiguous() for k, v in self.unet.state_dict().items()}
        state |= {f"text.{k}": v.detach().cpu().contiguous() for k, v in self.text.state_dict().items()}
        meta = {
            "kind": self.KIND,
            self.NET_KEY: {k: v for k, v in dict(self.unet.config).items() if k in self.NET_CONFIG},
            "text": self.text.config,
            "scheduler": self.scheduler_config,
            "default_guidance": self.default_guidance,
            "info": self.info,
        }
        with atomic_path(path) as tmp:
            save_file(state, str(tmp), metadata={"hypersd": json.dumps(meta)})

    def encode_prompt(self, prompts: list[str]) -> Cond:
        tokens = tokenize(list(prompts)).to(self.device)
        return Cond(self.text(tokens))

    def encode(self, images: torch.Tensor) -> torch.Tensor:
        if tuple(images.shape[1:]) != self.latent_shape:
            raise HypersdError(f"digits images must be [N, 1, 8, 8]; got {list(images.shape)}")
        return images

    def decode(self, latents: torch.Tensor) -> torch.Tensor:
        return latents.clamp(-1, 1)


class DigitsTeacher(DigitsWorldTeacher):
    """The ε-prediction UNet on SD1.5's DDPM schedule."""

    KIND, LABEL, NET_KEY = "digits-teacher", "digits teacher", "unet"
    NET_CONFIG, SCHEDULE_CONFIG, DEFAULT_PATH = UNET_CONFIG, SCHEDULER_CONFIG, DEFAULT_PATH

    def _init_schedule(self) -> None:
        # refuses a prediction type hypersd cannot read (epsilon and v_prediction it can)
        self.alphas_cumprod = DDPMSchedule.from_scheduler_config(self.scheduler_config).alphas_cumprod

    @classmethod
    def build_network(cls, config: dict) -> torch.nn.Module:
        return UNet2DConditionModel(**config)


def _file_digest(path) -> str:
    """Identifies the teacher's weights, for caches of its samples."""
    import hashlib

    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()[:16]


def _load_part(module: torch.nn.Module, state: dict, prefix: str, path) -> None:
    part = {k[len(prefix):]: v for k, v in state.items() if k.startswith(prefix)}
    missing, unexpected = module.load_state_dict(part, strict=False)
    if missing or unexpected:
        raise HypersdError(
            f"{path} does not match the digits teacher architecture: "
            f"missing {sorted(missing)[:5]}, unexpected {sorted(unexpected)[:5]}"
        )
