"""The image processor's resize / center crop / normalise, redone in torch so gradients flow.

A reward in a training loss must see what the library's own processor would give it, or the
scores it is trained against are not the published metric. Everything is read from the loaded
processor; nothing about sizes or statistics is hard-coded. The processor works on uint8 images
(x / 255); our images are in [-1, 1], so (x + 1) / 2 stands in for that rescale.

Resize uses torch's antialiased bicubic/bilinear, the same filters as PIL (which the processors
use). PIL rounds and clips to uint8 between its horizontal and vertical passes; torch does not,
so on smooth images the two agree within about one uint8 level, and on pixel noise single pixels
can differ by several. An image already at the target size is not resampled: it agrees exactly.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from hypersd.errors import HypersdError

# PIL resampling codes -> torch modes. LANCZOS (1) has no torch counterpart: bicubic is closest.
_MODES = {0: "nearest-exact", 1: "bicubic", 2: "bilinear", 3: "bicubic", 4: "area", 5: "bilinear"}


def _field(size, key):
    """One entry of a processor size: a dict (transformers 4) or a SizeDict (transformers 5)."""
    if size is None:
        return None
    return size.get(key) if isinstance(size, dict) else getattr(size, key, None)


class ImagePreprocess(nn.Module):
    def __init__(self, shortest_edge=None, size=None, crop=None, mean=(0.5,) * 3, std=(0.5,) * 3,
                 resample: int = 3):
        super().__init__()
        if shortest_edge is None and size is None:
            raise HypersdError("image preprocessing needs a size: shortest_edge or (height, width)")
        self.shortest_edge, self.size, self.crop = shortest_edge, size, crop
        self.mode = _MODES.get(int(resample), "bicubic")
        # plain floats, not buffers: a reward cast to fp16 must not round the statistics
        self.mean, self.std = tuple(map(float, mean)), tuple(map(float, std))

    @classmethod
    def from_processor(cls, proc) -> "ImagePreprocess":
        """From a transformers image processor (CLIPImageProcessor, BlipImageProcessor, ...)."""
        resample = getattr(proc, "resample", None)
        kw = {"resample": 3 if resample is None else int(resample)}
        if getattr(proc, "do_resize", True):
            size = getattr(proc, "size", None)
            if _field(size, "shortest_edge") and not _field(size, "longest_edge"):
                kw["shortest_edge"] = int(_field(size, "shortest_edge"))
            elif _field(size, "height") and _field(size, "width"):
                kw["size"] = (int(_field(size, "height")), int(_field(size, "width")))
            else:
                raise HypersdError(f"image processor size {size} is not supported; use shortest_edge or height/width")
        if getattr(proc, "do_center_crop", False):
            crop = getattr(proc, "crop_size", None)
            kw["crop"] = (int(_field(crop, "height")), int(_field(crop, "width")))
        if not kw.get("shortest_edge") and not kw.get("size"):
            if "crop" not in kw:
                raise HypersdError("the image processor neither resizes nor crops; the model's input size is unknown")
            kw["size"] = kw["crop"]  # no resize configured: the crop size is the model's input size
        if getattr(proc, "do_normalize", True):
            kw["mean"], kw["std"] = tuple(proc.image_mean), tuple(proc.image_std)
        else:
            kw["mean"], kw["std"] = (0.0,) * 3, (1.0,) * 3
        return cls(**kw)

    def output_size(self, h: int, w: int) -> tuple[int, int]:
        """Size after the resize step, rounded as transformers rounds (int(), not round())."""
        if self.size is not None:
            return self.size
        s = self.shortest_edge
        return (s, int(s * w / h)) if h <= w else (int(s * h / w), s)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        x = (images.float() + 1) / 2
        h, w = self.output_size(*x.shape[-2:])
        if (h, w) != tuple(x.shape[-2:]):
            aa = self.mode in ("bilinear", "bicubic")
            corners = {"align_corners": False} if aa else {}
            x = F.interpolate(x, size=(h, w), mode=self.mode, antialias=aa, **corners)
            # PIL's bicubic overshoots too, and its uint8 output clips it.
            x = x.clamp(0, 1)
        if self.crop is not None:
            ch, cw = self.crop
            if ch > h or cw > w:
                raise HypersdError(f"crop {ch}x{cw} is larger than the resized image {h}x{w}; "
                                   "check the image processor's size and crop_size")
            top, left = (h - ch) // 2, (w - cw) // 2
            x = x[..., top:top + ch, left:left + cw]
        mean = torch.tensor(self.mean, device=x.device).view(1, -1, 1, 1)
        std = torch.tensor(self.std, device=x.device).view(1, -1, 1, 1)
        return (x - mean) / std
