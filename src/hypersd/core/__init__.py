"""What both model families share: the noise schedule and its parameterisations (HYPERSD.md §5)."""

from hypersd.core.noise import (
    DDPMSchedule,
    FlowSchedule,
    NoiseSchedule,
    flux_shift,
    shift_sigma,
)

__all__ = ["DDPMSchedule", "FlowSchedule", "NoiseSchedule", "flux_shift", "shift_sigma"]
