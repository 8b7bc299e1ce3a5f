"""Small Transformers: ``CharGPT`` (decoder-only character language model) and ``ViTTiny``.

Both are pre-LayerNorm Transformers built only from ``nn.Linear``, ``nn.Embedding``,
``nn.Conv2d`` and ``nn.LayerNorm`` so that LaPerm's choice of rows by module type applies
unchanged: an embedding table permutes each token's (or position's) vector, every Linear
(the packed q/k/v projection included: one ``Linear(d, 3d)``, one row per output unit of q,
k or v) permutes each output unit's incoming weights, the patch-embedding convolution each
filter; LayerNorm parameters and biases are free by default.

Initialisation (Keras-style, see :func:`laperm.init.keras_init_`): every Linear/Conv kernel
and every embedding table He-uniform, U(±sqrt(6 / fan_in)) with fan_in = in_features (an
embedding's fan-in is its width, which is exactly the Keras bound of the tied output layer
``Linear(width, vocab)`` that reuses the table); biases zero; LayerNorm weight 1, bias 0.

``CharGPT`` ties its input and output embeddings: the output logits are
``h @ tok.weight.T``, with no separate ``Linear`` module, so the table is one parameter and
LaPerm permutes it once. Its ``forward`` returns one row of logits per predicted character,
``(batch * context, vocab)``, so the engine's classification loss and accuracy apply to
language modelling as they are (``logits_3d`` gives the ``(batch, context, vocab)`` view).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from .layers import KerasModelMixin

__all__ = ["CharGPT", "ViTTiny", "Block", "SelfAttention", "LAYER_TYPES", "layer_type", "weight_role"]


class SelfAttention(nn.Module):
    """Multi-head self-attention with one packed ``Linear(d, 3d)`` for q, k and v."""

    def __init__(self, width: int, heads: int, causal: bool) -> None:
        super().__init__()
        if width % heads:
            raise ValueError(f"width {width} must be divisible by heads {heads}")
        self.heads, self.causal = heads, causal
        self.qkv = nn.Linear(width, 3 * width)
        self.proj = nn.Linear(width, width)

    def forward(self, x: Tensor) -> Tensor:
        b, t, d = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
        # (softmax(q k^T / sqrt(d_head)) v, with the causal mask when asked for)
        y = F.scaled_dot_product_attention(q, k, v, is_causal=self.causal)
        return self.proj(y.transpose(1, 2).reshape(b, t, d))


class Block(nn.Module):
    """Pre-LayerNorm Transformer block: x + attn(LN(x)), then x + MLP(LN(x)) with GELU."""

    def __init__(self, width: int, heads: int, causal: bool, mlp_ratio: int = 4) -> None:
        super().__init__()
        self.ln1 = nn.LayerNorm(width)
        self.attn = SelfAttention(width, heads, causal)
        self.ln2 = nn.LayerNorm(width)
        self.fc1 = nn.Linear(width, mlp_ratio * width)
        self.fc2 = nn.Linear(mlp_ratio * width, width)

    def forward(self, x: Tensor) -> Tensor:
        x = x + self.attn(self.ln1(x))
        return x + self.fc2(F.gelu(self.fc1(self.ln2(x))))


class CharGPT(KerasModelMixin, nn.Module):
    """Decoder-only character language model: token + position embeddings, ``layers`` causal
    pre-LN blocks, a final LayerNorm, tied output embedding.

    Defaults (4 layers, width 128, 4 heads, context 128) give 809,728 + 128 * vocab
    parameters: 823,040 for the default corpus's 103 characters plus ``<unk>``.
    """

    def __init__(
        self,
        vocab_size: int = 128,
        context: int = 128,
        width: int = 128,
        layers: int = 4,
        heads: int = 4,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        if vocab_size < 2:
            raise ValueError(f"vocab_size must be at least 2, got {vocab_size}")
        self.context = context
        self.tok = nn.Embedding(vocab_size, width)
        self.pos = nn.Embedding(context, width)
        self.blocks = nn.Sequential(*[Block(width, heads, causal=True) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.reset_parameters(generator)

    def logits_3d(self, idx: Tensor) -> Tensor:
        """``(batch, t, vocab)`` next-character logits for ``(batch, t)`` character ids, t <= context."""
        t = idx.shape[1]
        if t > self.context:
            raise ValueError(f"input of {t} characters is longer than the context of {self.context}")
        h = self.tok(idx) + self.pos(torch.arange(t, device=idx.device))
        return F.linear(self.ln_f(self.blocks(h)), self.tok.weight)  # tied output embedding

    def forward(self, idx: Tensor) -> Tensor:
        return self.logits_3d(idx).flatten(0, 1)

    @torch.no_grad()
    def generate(
        self, prompt: Tensor, length: int, temperature: float = 0.0, generator: torch.Generator | None = None
    ) -> Tensor:
        """Continue the 1-D id sequence ``prompt`` by ``length`` characters: greedy when
        ``temperature`` is 0, else sampled from softmax(logits / temperature) with ``generator``
        (a CPU generator: the draws are made on the CPU, so a seed gives one sample on any device)."""
        was = self.training
        self.eval()
        ids = prompt.clone()
        for _ in range(length):
            logits = self.logits_3d(ids[-self.context :].unsqueeze(0))[0, -1].float().cpu()
            if temperature <= 0:
                nxt = logits.argmax()
            else:
                nxt = torch.multinomial(F.softmax(logits / temperature, -1), 1, generator=generator)[0]
            ids = torch.cat([ids, nxt.to(ids.device).view(1)])
        self.train(was)
        return ids[len(prompt) :]


class ViTTiny(KerasModelMixin, nn.Module):
    """Vision Transformer: non-overlapping ``patch`` x ``patch`` patches embedded by a Conv2d of
    stride ``patch``, learnt position embeddings, pre-LN blocks, mean pooling over patches, a
    final LayerNorm and a linear classifier. (Mean pooling, not a class token: every parameter
    then has a natural row, and the class token's extra position is not needed.)"""

    def __init__(
        self,
        input_shape: tuple[int, int, int] = (1, 28, 28),
        num_classes: int = 10,
        patch: int = 7,
        width: int = 64,
        layers: int = 4,
        heads: int = 4,
        generator: torch.Generator | None = None,
    ) -> None:
        super().__init__()
        c, h, w = input_shape
        if h % patch or w % patch:
            raise ValueError(f"image size {h}x{w} must be divisible by the patch size {patch}")
        self.embed = nn.Conv2d(c, width, patch, stride=patch)
        self.pos = nn.Embedding((h // patch) * (w // patch), width)
        self.blocks = nn.Sequential(*[Block(width, heads, causal=False) for _ in range(layers)])
        self.ln_f = nn.LayerNorm(width)
        self.head = nn.Linear(width, num_classes)
        self.reset_parameters(generator)

    def forward(self, x: Tensor) -> Tensor:
        h = self.embed(x).flatten(2).transpose(1, 2)  # (batch, patches, width)
        h = self.blocks(h + self.pos.weight)
        return self.head(self.ln_f(h).mean(1))


def _vit_cifar(**kwargs: object) -> ViTTiny:
    return ViTTiny(input_shape=(3, 32, 32), patch=4, **kwargs)  # type: ignore[arg-type]


# -- naming the parameters by what they do (for analyses: profiles, sync costs) -----------------

LAYER_TYPES = (
    ("embeddings", ("tok.", "pos.", "embed.")),
    ("attention", (".attn.",)),
    ("MLP", (".fc1.", ".fc2.")),
    ("head", ("head.",)),
)


def layer_type(name: str) -> str:
    """embeddings / attention / MLP / head, from a Transformer parameter's name."""
    for kind, marks in LAYER_TYPES:
        if any(m in name or name.startswith(m) for m in marks):
            return kind
    return "other"


def weight_role(name: str) -> str:
    """A permuted tensor's role in its block, the same in every block: ``blocks.2.attn.qkv.weight``
    -> ``attn.qkv``, ``tok.weight`` -> ``tok``."""
    parts = name.split(".")
    if len(parts) > 2 and parts[0] == "blocks" and parts[1].isdigit():
        parts = parts[2:]
    return ".".join(parts[:-1]) if len(parts) > 1 else name
