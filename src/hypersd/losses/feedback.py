"""Human feedback learning (HYPERSD.md §2): reward hinge on the student's own samples, and a
perceptual loss on real images it reconstructs.

Both losses take the network they train as an ``eps_fn`` (a role's ``fn``: the feedback role, or
DMD's student), so the same code trains a feedback LoRA on top of a frozen distilled one, or adds
feedback to DMD.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
from torch import nn

from hypersd.core.schedule import inference_timesteps
from hypersd.core.solver import add_noise, ddim_jump, denoise
from hypersd.errors import HypersdError


@dataclass
class RewardTerm:
    """One reward of the hinge: weight·ReLU(alpha − reward)."""

    name: str
    reward: nn.Module
    weight: float = 1.0
    alpha: float = float("inf")  # no threshold: the reward itself is maximised


def load_terms(specs: list[dict], device=None) -> list[RewardTerm]:
    """Reward terms from a stage's ``rewards`` list: [{name, weight, alpha, path, options}]."""
    from hypersd.rewards import load_reward

    terms = []
    for spec in specs:
        reward = load_reward(spec["name"], spec.get("path"), device=device, **(spec.get("options") or {}))
        reward.requires_grad_(False)
        alpha = spec.get("alpha")
        terms.append(RewardTerm(spec["name"], reward, float(spec.get("weight", 1.0)),
                                float("inf") if alpha is None else float(alpha)))
    return terms


def reward_hinge(scores: torch.Tensor, alpha: float) -> torch.Tensor:
    """ReLU(α − r), averaged: rewards above α are not chased (the guard against reward hacking)."""
    if alpha == float("inf"):
        return -scores.mean()
    return torch.relu(alpha - scores).mean()


def reward_loss(terms: list[RewardTerm], images: torch.Tensor, prompts: list[str]) -> tuple[torch.Tensor, dict]:
    """Σ_d w_d·ReLU(α_d − r_d(images, prompts)); also each reward's mean, for the logs."""
    total, logs = images.new_zeros(()), {}
    for term in terms:
        scores = term.reward(images, prompts)
        total = total + term.weight * reward_hinge(scores, term.alpha)
        logs[term.name] = scores.detach().mean()
    return total, logs


def sample_until(eps_fn, noise: torch.Tensor, timesteps: list[int], stop: int, alphas_cumprod) -> torch.Tensor:
    """Run the few-step DDIM sampler without gradient up to step ``stop``, then predict x0 there
    with gradient: the reward's gradient reaches the student through that one prediction."""
    x = noise
    with torch.no_grad():
        for i in range(stop):
            x = ddim_jump(x, eps_fn(x, timesteps[i]), timesteps[i], timesteps[i + 1], alphas_cumprod)
    return denoise(eps_fn, x, timesteps[stop], alphas_cumprod)


def stop_options(sample_steps: list[int], t_range: list[int], T: int,
                 spacing: str = "trailing") -> list[tuple[int, int]]:
    """Every (k, i): step i of a k-step sampler, k from ``sample_steps``, with its timestep in ``t_range``;
    T and ``spacing`` are the teacher's schedule's."""
    return [(k, i) for k in sample_steps for i, t in enumerate(inference_timesteps(k, T, spacing=spacing))
            if t_range[0] <= t <= t_range[1]]


def draw_stop(sample_steps: list[int], t_range: list[int], T: int, generator=None,
              spacing: str = "trailing") -> tuple[list[int], int]:
    """A step count k from ``sample_steps`` and a step of its sampler whose timestep is in ``t_range``."""
    options = stop_options(sample_steps, t_range, T, spacing)
    if not options:
        raise HypersdError(f"no step of a {sample_steps}-step sampler has its timestep in {t_range}; widen t_range")
    k, i = options[int(torch.randint(len(options), (1,), generator=generator))]
    return inference_timesteps(k, T, spacing=spacing), i


# -- perceptual feedback -----------------------------------------------------------------------
def digits_features() -> nn.Module:
    """The digits reward model's hidden layer (never the held-out evaluator's)."""
    from hypersd.digits.judges import load_judge

    return load_judge("reward").net[:6]


PERCEPTION = {"digits": digits_features}


def load_perception(name: str) -> nn.Module:
    if name not in PERCEPTION:
        raise HypersdError(f"unknown perceptual model {name!r}; choose one of {', '.join(PERCEPTION)}")
    return PERCEPTION[name]().eval().requires_grad_(False)


def perceptual_loss(features: nn.Module, eps_fn, z: torch.Tensor, noise: torch.Tensor, t: torch.Tensor,
                    alphas_cumprod, decode) -> torch.Tensor:
    """Diffuse real latents z to t, denoise in one prediction, compare with z in feature space."""
    x0 = denoise(eps_fn, add_noise(z, noise, t, alphas_cumprod), t, alphas_cumprod)
    with torch.no_grad():
        want = features(decode(z))
    return (features(decode(x0)) - want).pow(2).mean()
