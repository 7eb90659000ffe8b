"""Teachers: one interface (``Teacher``) for the digits world, SD1.5, SDXL, SD3/SD3.5 and FLUX.1."""

from hypersd.teachers.base import Cond, Teacher
from hypersd.teachers.load import BACKBONES, load_teacher

__all__ = ["BACKBONES", "Cond", "Teacher", "load_teacher"]
