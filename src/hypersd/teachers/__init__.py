"""Teachers: one interface (``Teacher``) for the digits world, SD1.5 and SDXL."""

from .base import Cond, Teacher
from .load import BACKBONES, load_teacher

__all__ = ["BACKBONES", "Cond", "Teacher", "load_teacher"]
