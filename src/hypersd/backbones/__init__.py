"""Backbones by name: the registry a recipe's ``backbone:`` is looked up in.

A new model family registers its ``Backbone`` here (or from its own module with ``register``).
"""

from __future__ import annotations

from hypersd.backbones.base import Backbone
from hypersd.backbones.digits import DigitsBackbone, FlowDigitsBackbone
from hypersd.backbones.flow import FlowBackbone, FluxBackbone
from hypersd.backbones.sd import SDBackbone
from hypersd.errors import HypersdError

BACKBONES: dict[str, Backbone] = {}


def register(backbone: Backbone) -> Backbone:
    """Make ``backbone`` available to recipes under its name (a second one of a name replaces it)."""
    if not backbone.name:
        raise HypersdError(f"{type(backbone).__name__} has no name to register it under")
    BACKBONES[backbone.name] = backbone
    return backbone


def get_backbone(name: str) -> Backbone:
    if name not in BACKBONES:
        raise HypersdError(f"unknown backbone {name!r}; choose one of {', '.join(BACKBONES)}")
    return BACKBONES[name]


for _b in (DigitsBackbone(), FlowDigitsBackbone(), SDBackbone("sd15"), SDBackbone("sdxl"), FlowBackbone("sd3"),
           FluxBackbone("flux")):
    register(_b)

__all__ = ["BACKBONES", "Backbone", "DigitsBackbone", "FlowBackbone", "FlowDigitsBackbone", "FluxBackbone", "SDBackbone",
           "get_backbone", "register"]
