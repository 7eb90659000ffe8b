"""The compile path and the dtype a run uses (the device: ``hypersd.device``)."""

from __future__ import annotations

from hypersd.errors import HypersdError

DTYPES = ("float32", "float16", "bfloat16")
COMPILE = ("auto", "on", "off")
COMPILE_MIN_IMAGES = 32  # "auto" compiles from this many images on: compiling takes about a minute
SAME_IMAGE = 4 / 127.5  # the compiled path's images may differ from eager's by 4 levels of 8 bits at most


def pick_path(max_diff: float, eager_s: float, compiled_s: float) -> tuple[str, str]:
    """(path, why): "compiled" only if its images are eager's (within ``SAME_IMAGE``) and it is faster."""
    measured = f"eager {1000 * eager_s:.1f} ms, compiled {1000 * compiled_s:.1f} ms a batch, max |diff| {max_diff:.2g}"
    if not max_diff <= SAME_IMAGE:  # NaN included
        return "eager", f"eager: the compiled path gave other images ({measured})"
    if compiled_s >= eager_s:
        return "eager", f"eager: compiling did not make it faster ({measured})"
    return "compiled", f"compiled ({measured})"


def pick_compile(flag: str, device: str, n_images: int) -> bool:
    """--compile on / off, or auto: on a GPU and from ``COMPILE_MIN_IMAGES`` images on, where it pays."""
    if flag not in COMPILE:
        raise HypersdError(f"unknown --compile {flag!r}; choose one of {', '.join(COMPILE)}")
    if flag == "auto":
        return str(device).startswith("cuda") and n_images >= COMPILE_MIN_IMAGES
    return flag == "on"


def pick_dtype(dtype: str, device: str) -> str:
    if dtype == "auto":
        return "float16" if str(device).startswith("cuda") else "float32"
    if dtype not in DTYPES:
        raise HypersdError(f"unknown --dtype {dtype!r}; choose one of auto, {', '.join(DTYPES)}")
    return dtype
