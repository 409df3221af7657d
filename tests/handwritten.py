"""Hand-written twins of the zoo's Hugging Face models: the same function under other names and layouts.

``MiniGPT`` computes what the zoo's ``GPT2LMHeadModel`` computes, written as
plain torch modules: a ``ModuleList`` of blocks, ``nn.Linear`` layout
(``(out, in)``, where HF's ``Conv1D`` holds ``(in, out)``), one fused ``qkv``
projection split by ``chunk`` (``qkv="separate"``: separate q, k and v
projections; ``"unbind"``/``"index"``: reshaped to ``(B, T, 3, H, D)``,
permuted and unbound or indexed, as timm does) and an untied head weight
equal to the embedding. ``from_hf``
copies an HF GPT-2's weights into one, permuted or not. ``renamed`` wraps any
module under other names (a BERT against a renamed copy).
"""
from __future__ import annotations

import math

import torch
from torch import nn
from torch.nn import functional as F


class Block(nn.Module):
    def __init__(self, dim: int, heads: int, qkv: str):
        super().__init__()
        self.heads, self.style = heads, qkv
        self.norm_a = nn.LayerNorm(dim)
        if qkv == "separate":
            self.q, self.k, self.v = nn.Linear(dim, dim), nn.Linear(dim, dim), nn.Linear(dim, dim)
        else:
            self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.norm_b = nn.LayerNorm(dim)
        self.up = nn.Linear(dim, 4 * dim)
        self.down = nn.Linear(4 * dim, dim)

    def forward(self, x, mask, gelu: str = "tanh"):
        b, t, d = x.shape
        h = self.norm_a(x)
        heads = lambda z: z.reshape(b, t, self.heads, d // self.heads).permute(0, 2, 1, 3)  # noqa: E731
        if self.style == "separate":
            q, k, v = heads(self.q(h)), heads(self.k(h)), heads(self.v(h))
        elif self.style == "chunk":
            q, k, v = (heads(z) for z in self.qkv(h).chunk(3, dim=-1))
        else:
            qkv = self.qkv(h).reshape(b, t, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
            q, k, v = qkv.unbind(0) if self.style == "unbind" else (qkv[0], qkv[1], qkv[2])
        a = F.scaled_dot_product_attention(q, k, v, mask, scale=1 / math.sqrt(d // self.heads))
        x = x + self.out(a.permute(0, 2, 1, 3).reshape(b, t, d))
        u = self.up(self.norm_b(x))
        if gelu == "tanh":
            u = 0.5 * u * (1.0 + torch.tanh(math.sqrt(2.0 / math.pi) * (u + 0.044715 * torch.pow(u, 3.0))))
        else:
            u = torch.relu(u)
        return x + self.down(u)


class MiniGPT(nn.Module):
    """GPT-2 as plain modules (see module doc); ``act="relu"`` differs from GPT-2 in one op."""

    def __init__(self, vocab: int = 97, dim: int = 32, layers: int = 2, heads: int = 4, positions: int = 64,
                 qkv: str = "chunk", act: str = "tanh"):
        super().__init__()
        self.act = act
        self.tokens = nn.Embedding(vocab, dim)
        self.positions = nn.Embedding(positions, dim)
        self.blocks = nn.ModuleList(Block(dim, heads, qkv) for _ in range(layers))
        self.final_norm = nn.LayerNorm(dim)
        self.unembed = nn.Linear(dim, vocab, bias=False)

    def forward(self, idx):
        t = idx.shape[1]
        pos = torch.arange(t, device=idx.device)
        x = self.tokens(idx) + self.positions(pos)
        mask = torch.ones(t, t, dtype=torch.bool, device=idx.device).tril()
        for block in self.blocks:
            x = block(x, mask, self.act)
        return self.unembed(self.final_norm(x))


@torch.no_grad()
def from_hf(hf, qkv: str = "chunk", act: str = "tanh") -> MiniGPT:
    """A ``MiniGPT`` holding the weights of the HF ``GPT2LMHeadModel`` ``hf``."""
    cfg = hf.config
    m = MiniGPT(cfg.vocab_size, cfg.n_embd, cfg.n_layer, cfg.n_head, cfg.n_positions, qkv, act).eval()
    tr = hf.transformer
    m.tokens.weight.copy_(tr.wte.weight)
    m.positions.weight.copy_(tr.wpe.weight)
    m.unembed.weight.copy_(hf.lm_head.weight)
    m.final_norm.load_state_dict(tr.ln_f.state_dict())
    for blk, h in zip(m.blocks, tr.h):
        blk.norm_a.load_state_dict(h.ln_1.state_dict())
        blk.norm_b.load_state_dict(h.ln_2.state_dict())
        w, b = h.attn.c_attn.weight.t(), h.attn.c_attn.bias
        if qkv == "separate":
            for i, lin in enumerate((blk.q, blk.k, blk.v)):
                lin.weight.copy_(w[i * cfg.n_embd:(i + 1) * cfg.n_embd])
                lin.bias.copy_(b[i * cfg.n_embd:(i + 1) * cfg.n_embd])
        else:
            blk.qkv.weight.copy_(w)
            blk.qkv.bias.copy_(b)
        for lin, conv in ((blk.out, h.attn.c_proj), (blk.up, h.mlp.c_fc), (blk.down, h.mlp.c_proj)):
            lin.weight.copy_(conv.weight.t())
            lin.bias.copy_(conv.bias)
    return m


def mini_gpt(seed: int = 0, qkv: str = "chunk", act: str = "tanh"):
    """A ``MiniGPT`` with the weights of the zoo's GPT-2 of ``seed``: ``(module, (ids,))``."""
    import zoo

    hf, args = zoo.gpt2(seed)
    return from_hf(hf, qkv, act), args


class Renamed(nn.Module):
    """``inner`` under other attribute names: every submodule of ``inner`` is reached through ``body``."""

    def __init__(self, inner: nn.Module):
        super().__init__()
        self.body = inner

    def forward(self, *args, **kwargs):
        return self.body(*args, **kwargs)


def gpt2_b():
    """The zoo's GPT-2 of seed 1 (the other parent), as a Hugging Face model."""
    import zoo

    return zoo.gpt2(1)


def mini_gpt_b():
    """The zoo's GPT-2 of seed 1 written as a ``MiniGPT``."""
    return mini_gpt(1)


def mini_gpt_relu():
    """A ``MiniGPT`` whose MLP takes ReLU: GPT-2 but for one op."""
    return mini_gpt(1, act="relu")
