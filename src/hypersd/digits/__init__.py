"""The embedded world: scikit-learn's 8x8 handwritten digits, a shipped teacher and judges."""

from pathlib import Path

ASSETS = Path(__file__).parent / "assets"
