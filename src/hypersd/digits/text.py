"""A small text encoder for the digits world, trained together with the teacher.

Word-level: the vocabulary is the words of the world's prompts. The empty prompt is all padding,
which is what classifier-free guidance's unconditional branch sees.
"""

from __future__ import annotations

import torch
from torch import nn

from hypersd.digits.data import NAMES
from hypersd.errors import HypersdError

VOCAB = ["<pad>", "a", "handwritten", "digit", *NAMES]
MAX_WORDS = 6


def tokenize(prompts: list[str]) -> torch.Tensor:
    index = {w: i for i, w in enumerate(VOCAB)}
    rows = []
    for p in prompts:
        words = p.lower().replace(",", " ").split()
        unknown = [w for w in words if w not in index]
        if unknown:
            raise HypersdError(
                f"the digits world does not know the word(s) {unknown} in prompt {p!r}; "
                f"its words are: {' '.join(VOCAB[1:])} (e.g. 'a handwritten digit seven')"
            )
        if len(words) > MAX_WORDS:
            raise HypersdError(f"prompt {p!r} has more than {MAX_WORDS} words")
        rows.append([index[w] for w in words] + [0] * (MAX_WORDS - len(words)))
    return torch.tensor(rows, dtype=torch.long)


class DigitTextEncoder(nn.Module):
    def __init__(self, dim: int = 64, layers: int = 1, heads: int = 4):
        super().__init__()
        self.config = {"dim": dim, "layers": layers, "heads": heads}
        self.tok = nn.Embedding(len(VOCAB), dim)
        self.pos = nn.Parameter(torch.zeros(MAX_WORDS, dim))
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.norm = nn.LayerNorm(dim)

    def forward(self, tokens: torch.Tensor) -> torch.Tensor:
        h = self.tok(tokens) + self.pos
        return self.norm(self.encoder(h))
