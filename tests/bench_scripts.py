"""The benchmark scripts as modules, for the tests of their pieces (benchmarks/ is scripts, not a package)."""

import importlib
import sys
from pathlib import Path

BENCH = Path(__file__).resolve().parents[1] / "benchmarks"


def bench_module(name: str):
    """benchmarks/<name>.py imported; its folder is on the path only while it imports (its own
    imports of sibling scripts, e.g. speckle, resolve then)."""
    sys.path.insert(0, str(BENCH))
    try:
        return importlib.import_module(name)
    finally:
        sys.path.remove(str(BENCH))
