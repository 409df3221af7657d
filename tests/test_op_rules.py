"""Rules for aliases, variants and composite ops, each on a tiny hand-built model.

For every model (``MODELS``: factory, op, a parameter the op reads or writes):
the op really appears in the torch.export graph, the analysis has no unruled
op and no rule that fits nothing, a permuted copy computes the same function
while that parameter moves, and fusing that copy back
into the original (weight matching) gives the original's function and weights.
"""
from __future__ import annotations

import warnings

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import fxfuse
from fxfuse.frontend.verify import compare_outputs
from zoo import _informative

pytestmark = pytest.mark.usefixtures("one_thread")
TOL = 1e-4


class Block(nn.Module):
    """``head(f(self, stem(x)))``: a hidden width on both sides of the op under test."""

    def __init__(self, f, stem: nn.Module, head: nn.Module, **extra: nn.Module):
        super().__init__()
        self.f, self.stem, self.head = f, stem, head
        for name, module in extra.items():
            setattr(self, name, module)

    def forward(self, x):
        return self.head(self.f(self, self.stem(x)))


def _conv_model(f, mid: nn.Module | None = None, c_in: int = 6, c_out: int = 6, **extra):
    head = nn.Sequential(nn.Conv2d(c_out, 5, 3, padding=1), nn.AdaptiveAvgPool2d(1), nn.Flatten(), nn.Linear(5, 3))
    return Block(f, nn.Sequential(nn.Conv2d(3, c_in, 3, padding=1), nn.ReLU()), head, **({"mid": mid} if mid else {}),
                 **extra), (torch.randn(2, 3, 8, 8),)


def _mlp_model(f, hidden: int = 12, **extra):
    return Block(f, nn.Linear(8, hidden), nn.Linear(hidden, 3), **extra), (torch.randn(4, 8),)


class Attention(nn.Module):
    """Hand-written attention: q heads ``heads``, key/value heads ``kv`` made by ``mix`` (sdpa, einsum, repeat)."""

    def __init__(self, mix: str, dim: int = 16, heads: int = 4, kv: int = 4, head_dim: int = 4):
        super().__init__()
        self.mix, self.heads, self.kv, self.hd = mix, heads, kv, head_dim
        self.embed = nn.Linear(6, dim)
        self.q = nn.Linear(dim, heads * head_dim)
        self.k = nn.Linear(dim, kv * head_dim)
        self.v = nn.Linear(dim, kv * head_dim)
        self.o = nn.Linear(heads * head_dim, dim)
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.embed(x)
        q = self.q(h).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(h).view(b, s, self.kv, self.hd).transpose(1, 2)
        v = self.v(h).view(b, s, self.kv, self.hd).transpose(1, 2)
        if self.mix == "einsum":
            scores = torch.einsum("bhqd,bhkd->bhqk", q, k) / self.hd ** 0.5
            a = torch.einsum("bhqk,bhkd->bhqd", scores.softmax(-1), v)
        elif self.mix == "repeat":
            rep = self.heads // self.kv
            a = F.scaled_dot_product_attention(q, k.repeat_interleave(rep, dim=1), v.repeat_interleave(rep, dim=1))
        else:  # one key/value head broadcast over the query heads
            a = F.scaled_dot_product_attention(q, k, v)
        h = h + self.o(a.transpose(1, 2).reshape(b, s, -1))
        return self.head(h.mean(1))


class SlicedQKV(Attention):
    """Attention whose one fused projection is cut into q, k and v by slices (Phi-3, Falcon, Persimmon)."""

    def __init__(self):
        super().__init__("sdpa")
        del self.q, self.k, self.v
        self.qkv = nn.Linear(16, 3 * self.heads * self.hd)

    def forward(self, x):
        b, s, _ = x.shape
        h = self.embed(x)
        y, n = self.qkv(h), self.heads * self.hd
        q, k, v = (part.view(b, s, self.heads, self.hd).transpose(1, 2)
                   for part in (y[..., :n], y[..., n:2 * n], y[..., 2 * n:]))
        h = h + self.o(F.scaled_dot_product_attention(q, k, v).transpose(1, 2).reshape(b, s, -1))
        return self.head(h.mean(1))


class PartlyRead(nn.Module):
    """``h @ w[:, :12]``: the columns ``12:`` of ``w`` are read by no op of the graph."""

    def __init__(self):
        super().__init__()
        self.stem, self.w, self.head = nn.Linear(8, 12), nn.Parameter(torch.randn(12, 20)), nn.Linear(12, 3)

    def forward(self, x):
        return self.head((self.stem(x).relu() @ self.w[:, :12]).relu())


class EinsumMixer(nn.Module):
    """An MLP-mixer block in einsum form: token mixing ``bsc,ts->btc``, channel mixing ``btc,dc->btd``."""

    def __init__(self, seq: int = 5, dim: int = 8, hidden: int = 12):
        super().__init__()
        self.embed = nn.Linear(6, dim)
        self.tok = nn.Parameter(torch.randn(hidden, seq))
        self.tok_out = nn.Parameter(torch.randn(seq, hidden))
        self.up = nn.Parameter(torch.randn(hidden, dim))
        self.down = nn.Parameter(torch.randn(dim, hidden))
        self.head = nn.Linear(dim, 3)

    def forward(self, x):
        h = self.embed(x)
        t = torch.einsum("bsc,ts->btc", h, self.tok).relu()
        h = h + torch.einsum("btc,st->bsc", t, self.tok_out)
        u = torch.einsum("...c,dc->...d", h, self.up).relu()
        h = h + torch.einsum("btd,cd->btc", u, self.down)
        return self.head(h.mean(1))


class Recurrent(nn.Module):
    def __init__(self, cell: str, layers: int = 1, bidirectional: bool = False, batch_first: bool = True,
                 use_state: bool = False, proj: int = 0):
        super().__init__()
        cls = {"lstm": nn.LSTM, "gru": nn.GRU, "rnn": nn.RNN}[cell]
        self.embed = nn.Linear(6, 8)
        self.rnn = cls(8, 10, num_layers=layers, bidirectional=bidirectional, batch_first=batch_first,
                       **({"proj_size": proj} if proj else {}))
        self.batch_first, self.use_state = batch_first, use_state
        out = proj or 10
        self.head = nn.Linear(out if use_state else out * (2 if bidirectional else 1), 3)

    def forward(self, x):
        h = self.embed(x if self.batch_first else x.transpose(0, 1))
        out, state = self.rnn(h)
        if self.use_state:
            hn = state[0] if isinstance(state, tuple) else state
            return self.head(hn[-1])
        return self.head(out.mean(1 if self.batch_first else 0))


def _copy_and_fill(s, h):
    """In-place writes the graph keeps: ``copy_`` into a fresh tensor, ``fill_`` of another, both read after."""
    out = torch.empty_like(h)
    out.copy_(h.relu())
    bias = torch.empty(h.shape)
    bias.fill_(0.5)
    return out * s.scale + bias


def _meshgrid(indexing: str):
    """A (12, 7) matrix made from two vectors by ``meshgrid``, read by the hidden width on both sides."""
    def f(s, h):
        a, b = (s.u, s.v) if indexing == "ij" else (s.v, s.u)
        ga, gb = torch.meshgrid(a, b, indexing=indexing)
        return (h @ (ga * gb)).relu()

    return Block(f, nn.Linear(8, 12), nn.Linear(7, 3), u=nn.Parameter(torch.randn(12)),
                 v=nn.Parameter(torch.randn(7))), (torch.randn(4, 8),)


def _complex_rotation(s, h):
    """Pairs of units as complex numbers, each turned by its own ``polar(mag, angle)``: h (4, 12) is (6 × 2)."""
    z = torch.view_as_complex(h.view(h.shape[0], 6, 2)) * torch.polar(s.mag.abs() + 0.5, s.angle)
    return torch.view_as_real(z).flatten(1)


def _seq():
    return (torch.randn(2, 5, 6),)


def _conv1d_model(mid: nn.Module):
    """Conv1d stem (3 -> 6 channels), ``mid``, a Conv1d head pooled over length: channels on both sides of mid."""
    head = nn.Sequential(nn.Conv1d(6, 5, 3), nn.ReLU(), nn.AdaptiveAvgPool1d(1), nn.Flatten(), nn.Linear(5, 3))
    return Block(lambda s, h: s.mid(h).relu(), nn.Sequential(nn.Conv1d(3, 6, 3), nn.ReLU()), head,
                 mid=mid), (torch.randn(2, 3, 10),)


def _one_hot(s, h):
    """Rows of a table picked by a class computed from the input: the classes are pinned, the table's width moves."""
    cls = (h.sum(1).abs() * 3).long() % 5
    return h.relu() * (F.one_hot(cls, 5).to(h.dtype) @ s.table)


MODELS = {
    "numpy_T": (lambda: _mlp_model(lambda s, h: (torch.relu(h) @ s.w.T).relu() @ s.w2.T, w=nn.Parameter(
        torch.randn(10, 12)), w2=nn.Parameter(torch.randn(12, 10))),
                "aten.numpy_T.default", "w"),
    "multiply_square": (lambda: _mlp_model(lambda s, h: torch.multiply(torch.square(h), s.g.weight),
                                           g=nn.LayerNorm(12)), "aten.multiply.Tensor", "g.weight"),
    "conv2d_same": (lambda: _conv_model(lambda s, h: s.mid(h), nn.Conv2d(6, 6, 3, padding="same")),
                    "aten.conv2d.padding", "mid.weight"),
    "baddbmm": (lambda: (Block(lambda s, h: torch.baddbmm(s.b, h, s.w.expand(h.shape[0], -1, -1)).relu(),
                               nn.Linear(6, 8), nn.Linear(12, 3), w=nn.Parameter(torch.randn(8, 12)),
                               b=nn.Parameter(torch.randn(12))), _seq()), "aten.baddbmm.default", "w"),
    "stack": (lambda: _mlp_model(lambda s, h: torch.stack([s.a(h), s.c(h)], 1).relu().sum(1), hidden=12,
                                 a=nn.Linear(12, 12), c=nn.Linear(12, 12)), "aten.stack.default", "a.weight"),
    "prelu": (lambda: _conv_model(lambda s, h: s.mid(h), nn.PReLU(6)), "aten.prelu.default", "mid.weight"),
    "adaptive_max_pool2d": (lambda: (Block(lambda s, h: s.mid(h).flatten(1), nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU()), nn.Linear(24, 3), mid=nn.AdaptiveMaxPool2d(2)), (torch.randn(2, 3, 8, 8),)),
                            "aten.adaptive_max_pool2d.default", "head.weight"),
    "pixel_shuffle": (lambda: _conv_model(lambda s, h: s.mid(h), nn.PixelShuffle(2), c_in=24, c_out=6),
                      "aten.pixel_shuffle.default", "stem.0.weight"),
    "pixel_unshuffle": (lambda: _conv_model(lambda s, h: s.mid(h), nn.PixelUnshuffle(2), c_in=4, c_out=16),
                        "aten.pixel_unshuffle.default", "head.0.weight"),
    "instance_norm": (lambda: _conv_model(lambda s, h: s.mid(h), nn.InstanceNorm2d(6, affine=True)),
                      "aten.instance_norm.default", "mid.weight"),
    "weight_norm": (lambda: _mlp_model(lambda s, h: s.w(torch.relu(h)).relu(), hidden=12,
                                       w=nn.utils.parametrizations.weight_norm(nn.Linear(12, 12))),
                    "aten._weight_norm.default", "w.parametrizations.weight.original1"),
    "embedding_bag": (lambda: (nn.Sequential(nn.EmbeddingBag(20, 8, mode="max"), nn.Linear(8, 12), nn.ReLU(),
                                             nn.Linear(12, 3)), (torch.randint(0, 20, (3, 4)),)),
                      "aten.embedding_bag.padding_idx", "0.weight"),
    "upsample_nearest": (lambda: _conv_model(lambda s, h: s.mid(h), nn.Upsample(scale_factor=2)),
                         "aten.upsample_nearest2d.vec", "stem.0.weight"),
    "upsample_bilinear": (lambda: _conv_model(lambda s, h: F.interpolate(h, size=(11, 11), mode="bilinear")),
                          "aten.upsample_bilinear2d.vec", "stem.0.weight"),
    "im2col": (lambda: (Block(lambda s, h: s.mid(h).transpose(1, 2), nn.Sequential(nn.Conv2d(3, 6, 3), nn.ReLU()),
                              nn.Sequential(nn.Linear(24, 10), nn.ReLU(), nn.Linear(10, 3)), mid=nn.Unfold(2)),
                        (torch.randn(2, 3, 8, 8),)),
               "aten.im2col.default", "head.0.weight"),
    "repeat_interleave_gqa": (lambda: (Attention("repeat", kv=2), _seq()), "aten.repeat_interleave.self_int",
                              "k.weight"),
    "mqa_broadcast": (lambda: (Attention("sdpa", kv=1), _seq()), "aten.scaled_dot_product_attention.default",
                      "q.weight"),
    "rms_norm": (lambda: _mlp_model(lambda s, h: s.n(h), n=nn.RMSNorm(12)), "aten.rms_norm.default", "n.weight"),
    "einsum_attention": (lambda: (Attention("einsum"), _seq()), "aten.einsum.default", "q.weight"),
    "einsum_mixer": (lambda: (EinsumMixer(), _seq()), "aten.einsum.default", "tok"),
    "lstm": (lambda: (Recurrent("lstm"), _seq()), "aten.lstm.input", "rnn.weight_hh_l0"),
    "lstm_2layer_bidirectional": (lambda: (Recurrent("lstm", layers=2, bidirectional=True), _seq()),
                                  "aten.lstm.input", "rnn.weight_hh_l1_reverse"),
    "lstm_final_state": (lambda: (Recurrent("lstm", layers=2, use_state=True), _seq()), "aten.lstm.input",
                         "rnn.weight_hh_l1"),
    "lstm_projected": (lambda: (Recurrent("lstm", layers=2, bidirectional=True, proj=4), _seq()),
                       "aten.lstm.input", "rnn.weight_hr_l1"),
    "gru": (lambda: (Recurrent("gru", batch_first=False), _seq()), "aten.gru.input", "rnn.weight_hh_l0"),
    "gru_bidirectional": (lambda: (Recurrent("gru", bidirectional=True), _seq()), "aten.gru.input",
                          "rnn.weight_hh_l0_reverse"),
    "rnn": (lambda: (Recurrent("rnn", layers=2), _seq()), "aten.rnn_tanh.input", "rnn.weight_hh_l1"),
    "repeat": (lambda: (Block(lambda s, h: (h + s.probe.repeat(h.shape[0], 1)).relu().repeat(1, 2), nn.Linear(8, 12),
                              nn.Linear(24, 3), probe=nn.Parameter(torch.randn(1, 12))), (torch.randn(4, 8),)),
               "aten.repeat.default", "probe"),
    "meshgrid_ij": (lambda: _meshgrid("ij"), "aten.meshgrid.indexing", "u"),
    "meshgrid_xy": (lambda: _meshgrid("xy"), "aten.meshgrid.indexing", "v"),
    "fftn_real": (lambda: (Block(lambda s, h: torch.fft.fftn(h, dim=(1,)).real.relu(), nn.Linear(6, 12),
                                 nn.Linear(12, 3)), _seq()), "aten.fft_fftn.default", "stem.weight"),
    "rfft_imag": (lambda: (Block(lambda s, h: torch.fft.rfft(h, dim=1).imag.relu(), nn.Linear(6, 12),
                                 nn.Linear(12, 3)), _seq()), "aten.fft_rfft.default", "stem.weight"),
    "slice_fused_qkv": (lambda: (SlicedQKV(), _seq()), "aten.slice.Tensor", "qkv.weight"),
    "view_as_complex": (lambda: _mlp_model(_complex_rotation, mag=nn.Parameter(torch.randn(6)),
                                           angle=nn.Parameter(torch.randn(6))), "aten.view_as_complex.default", "mag"),
    "view_as_real": (lambda: _mlp_model(_complex_rotation, mag=nn.Parameter(torch.randn(6)),
                                        angle=nn.Parameter(torch.randn(6))), "aten.view_as_real.default", "angle"),
    "polar": (lambda: _mlp_model(_complex_rotation, mag=nn.Parameter(torch.randn(6)),
                                 angle=nn.Parameter(torch.randn(6))), "aten.polar.default", "mag"),
    "scatter_": (lambda: _mlp_model(lambda s, h: h.relu() * torch.zeros(h.shape[0], 5).scatter_(
        1, (h.sum(1, keepdim=True).abs() * 3).long() % 5, 1.0).cumsum(1).sum(1, keepdim=True)), "aten.scatter_.value", "stem.weight"),
    "glu": (lambda: _mlp_model(lambda s, h: s.w(F.glu(h, -1)).relu(), w=nn.Linear(6, 12)), "aten.glu.default",
            "stem.weight"),
    "glu_channels": (lambda: _conv_model(lambda s, h: F.glu(h, 1), c_in=12, c_out=6), "aten.glu.default",
                     "stem.0.weight"),
    "mv": (lambda: _mlp_model(lambda s, h: h.relu() * torch.mv(s.w, h.relu().mean(0)), w=nn.Parameter(
        torch.randn(12, 12))), "aten.mv.default", "w"),
    "vdot": (lambda: _mlp_model(lambda s, h: h.relu() * torch.vdot(s.u, h.relu().mean(0)),
                                u=nn.Parameter(torch.randn(12))), "aten.vdot.default", "u"),
    "dot": (lambda: _mlp_model(lambda s, h: h.relu() * torch.dot(s.u, h.relu().mean(0)),
                               u=nn.Parameter(torch.randn(12))), "aten.dot.default", "u"),
    "conv_transpose1d": (lambda: _conv1d_model(nn.ConvTranspose1d(6, 6, 3)), "aten.conv_transpose1d.default",
                         "mid.weight"),
    "tensor_split_indices": (lambda: _mlp_model(lambda s, h: torch.cat(
        [p.relu() * k for k, p in enumerate(torch.tensor_split(h, [4, 9], dim=1), 1)], 1)),
                             "aten.tensor_split.indices", "stem.weight"),
    "unfold": (lambda: (Block(lambda s, h: h.relu().unfold(1, 2, 1).mean(-1).mean(1), nn.Linear(6, 12),
                              nn.Linear(12, 3)), _seq()), "aten.unfold.default", "stem.weight"),
    "one_hot": (lambda: _mlp_model(_one_hot, table=nn.Parameter(torch.randn(5, 12))), "aten.one_hot.default",
                "table"),
    "broadcast_to": (lambda: _mlp_model(lambda s, h: (h + torch.broadcast_to(s.b, h.shape)).relu(),
                                        b=nn.Parameter(torch.randn(12))), "aten.broadcast_to.default", "b"),
    "max_dim_over_tokens": (lambda: (Block(lambda s, h: h.relu().max(dim=1).values, nn.Linear(6, 12),
                                           nn.Linear(12, 3)), _seq()), "aten.max.dim", "stem.weight"),
    "min_dim_over_tokens": (lambda: (Block(lambda s, h: h.relu().min(dim=1, keepdim=True).values.squeeze(1),
                                           nn.Linear(6, 12), nn.Linear(12, 3)), _seq()), "aten.min.dim", "stem.weight"),
    "min_all": (lambda: _mlp_model(lambda s, h: h.relu() - h.min()), "aten.min.default", "stem.weight"),
    "max_all": (lambda: _mlp_model(lambda s, h: h.relu() - h.max()), "aten.max.default", "stem.weight"),
    "copy_": (lambda: _mlp_model(_copy_and_fill, scale=nn.Parameter(torch.randn(12))), "aten.copy_.default", "scale"),
    "fill_": (lambda: _mlp_model(_copy_and_fill, scale=nn.Parameter(torch.randn(12))), "aten.fill_.Scalar", "scale"),
}


def build(name: str):
    torch.manual_seed(0)
    model, args = MODELS[name][0]()
    _informative(model)
    return model.eval(), args


def state_close(a: nn.Module, b: nn.Module) -> bool:
    sa, sb = a.state_dict(), b.state_dict()
    return sa.keys() == sb.keys() and all(torch.allclose(sa[k], sb[k], atol=1e-6) for k in sa
                                          if sa[k].is_floating_point())


@pytest.mark.parametrize("name", sorted(MODELS))
def test_rule_permutes_soundly_and_fuses_back(name):
    model, args = build(name)
    op = MODELS[name][1]
    analysis = fxfuse.analyze(model, args)
    assert op in {str(n.target) for n in analysis.traced.graph.nodes if n.op == "call_function"}
    assert analysis.unruled == (), [(u.op, u.reason) for u in analysis.unruled]
    assert analysis.unfit_rules == ()
    permuted = fxfuse.permute(model, args, seed=1)
    assert compare_outputs(model, permuted, args) <= TOL
    before, after = model.state_dict(), permuted.state_dict()
    moved = {k for k in before if before[k].is_floating_point() and not torch.equal(before[k], after[k])}
    assert MODELS[name][2] in moved, f"{name}: {MODELS[name][2]}, which {op} reads or writes, did not move"
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        fused = fxfuse.compile([permuted, model], args, target=1, cost="weights")
    assert compare_outputs(model, fused.module, args) <= TOL
    assert state_close(model, fused.module), f"{name}: the permuted copy did not fuse back to the original weights"


# ---------------------------------------------------------------- structure the rules give


def _spaces_of(analysis, param: str, axis: int) -> list:
    from fxfuse.frontend.spaces import expr_leaves

    return [leaf.space for leaf in expr_leaves(analysis.layout_of(param).axes[axis])]


def test_parse_equation():
    from fxfuse.frontend.layer_kinds import parse_equation

    assert parse_equation("bhqd, bhkd -> bhqk", 2) == ([list("bhqd"), list("bhkd")], list("bhqk"))
    assert parse_equation("ij,jk", 2) == ([list("ij"), list("jk")], list("ik"))  # implicit: letters seen once
    assert parse_equation("...c,dc->...d", 2) == ([["...", "c"], list("dc")], ["...", "d"])
    assert parse_equation("b...i,ji", 2) == ([["b", "...", "i"], list("ji")], ["...", "b", "j"])
    assert parse_equation("ii->i", 1) == ([list("ii")], ["i"])


def test_einsum_attention_has_heads_like_sdpa():
    """q·kᵀ contracts d per head: q and k rows share (heads × d), v and o's input share (heads × e)."""
    model, args = build("einsum_attention")
    a = fxfuse.analyze(model, args)
    q, k, v, o = (a.layout_of(n).axes[i] for n, i in (("q.weight", 0), ("k.weight", 0), ("v.weight", 0),
                                                     ("o.weight", 1)))
    assert q == k and v == o and q != v
    heads, d = _spaces_of(a, "q.weight", 0)
    assert _spaces_of(a, "v.weight", 0)[0] == heads and _spaces_of(a, "v.weight", 0)[1] != d
    assert all(a.spaces[s].free and a.spaces[s].size == 4 for s in (heads, d))


def test_einsum_summed_letter_on_one_operand_ties_nothing(tmp_path):
    """``bi,ij->b``: j is summed on the weight alone, so it ties to nothing; i is contracted and tied."""
    class M(nn.Module):
        def __init__(self):
            super().__init__()
            self.a, self.w = nn.Linear(4, 6), nn.Parameter(torch.randn(6, 5))

        def forward(self, x):
            return torch.einsum("bi,ij->b", self.a(x).relu(), self.w)

    torch.manual_seed(0)
    model, args = M().eval(), (torch.randn(3, 4),)
    a = fxfuse.analyze(model, args)
    (i,), (j,) = _spaces_of(a, "w", 0), _spaces_of(a, "w", 1)
    assert _spaces_of(a, "a.weight", 0) == [i] and a.spaces[i].free
    assert [m.param for m in a.spaces[j].members] == ["w"]
    assert compare_outputs(model, fxfuse.permute(model, args, seed=3), args) <= TOL


def test_slices_of_a_fused_projection_are_segments_with_heads():
    """q, k and v cut from one projection by slices: its rows are the segments [q | k | v], each heads × dims,
    free like three projections of their own."""
    model, args = build("slice_fused_qkv")
    a = fxfuse.analyze(model, args)
    rows = _spaces_of(a, "qkv.weight", 0)
    assert len(rows) == 6 and all(a.spaces[s].free for s in rows), [a.spaces[s] for s in rows]
    assert set(_spaces_of(a, "o.weight", 1)) <= set(rows)


def test_a_partial_slice_pins_the_part_no_op_reads():
    """The columns a slice leaves out are pinned (other input sizes would read them); the columns it takes move."""
    torch.manual_seed(0)
    model, args = PartlyRead().eval(), (torch.randn(4, 8),)
    a = fxfuse.analyze(model, args)
    rows, (taken, rest) = _spaces_of(a, "w", 0), _spaces_of(a, "w", 1)
    assert a.spaces[taken].free and a.spaces[taken].size == 12 and rows == _spaces_of(a, "stem.weight", 0)
    assert not a.spaces[rest].free and a.spaces[rest].size == 8 and "read by no op" in a.spaces[rest].reason
    permuted = fxfuse.permute(model, args, seed=1)
    assert compare_outputs(model, permuted, args) <= TOL
    mb, pb = model.stem.bias.detach(), permuted.stem.bias.detach()
    rows = torch.tensor([int((mb == v).nonzero()) for v in pb])  # the permutation of w's rows
    w, pw = model.w.detach()[rows], permuted.w.detach()
    assert torch.equal(pw[:, 12:], w[:, 12:]) and not torch.equal(pw[:, :12], w[:, :12])


def test_lstm_layers_and_directions_are_separate_spaces():
    model, args = build("lstm_2layer_bidirectional")
    a = fxfuse.analyze(model, args)
    units = {name: _spaces_of(a, f"rnn.weight_hh_{name}", 1)[0] for name in ("l0", "l0_reverse", "l1", "l1_reverse")}
    assert len(set(units.values())) == 4 and all(a.spaces[s].free for s in units.values())
    gate, unit = _spaces_of(a, "rnn.weight_ih_l1", 0)
    assert unit == units["l1"] and not a.spaces[gate].free and a.spaces[gate].size == 4
    # layer 1 reads the concatenation [forward units | backward units] of layer 0
    assert _spaces_of(a, "rnn.weight_ih_l1", 1) == [units["l0"], units["l0_reverse"]]
    assert _spaces_of(a, "head.weight", 1) == [units["l1"], units["l1_reverse"]]


def test_lstm_final_state_read_by_the_head_ties_all_layers():
    """h_n stacks every layer's units on one axis: read by the head, all layers share one permutation."""
    model, args = build("lstm_final_state")
    a = fxfuse.analyze(model, args)
    units = {_spaces_of(a, f"rnn.weight_hh_l{k}", 1)[0] for k in (0, 1)}
    assert len(units) == 1 and a.spaces[units.pop()].free


def test_gru_gates_are_pinned_inside_the_packed_rows():
    model, args = build("gru")
    a = fxfuse.analyze(model, args)
    layout = a.layout_of("rnn.weight_ih_l0").axes[0]
    gate, unit = _spaces_of(a, "rnn.weight_ih_l0", 0)
    assert layout.size == 30 and a.spaces[gate].size == 3 and a.spaces[unit].size == 10
    assert "distinct roles" in a.spaces[gate].reason and a.spaces[unit].free
    for name in ("rnn.weight_hh_l0", "rnn.bias_ih_l0", "rnn.bias_hh_l0"):
        assert a.layout_of(name).axes[0] == layout


def test_repeat_interleave_without_dim_fails_closed():
    model, args = _mlp_model(lambda s, h: s.w(h.relu().repeat_interleave(2).view(4, 24)), w=nn.Linear(24, 12))
    a = fxfuse.analyze(model.eval(), args)
    assert [u.op for u in a.unruled] == ["aten.repeat_interleave.self_int"]
    assert "does not fit" in a.unruled[0].reason
    assert compare_outputs(model, fxfuse.permute(model, args, seed=1), args) <= TOL


# ---------------------------------------------------------------- einsum equations, generated

from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

SIZES = {"h": 6, "p": 4, "q": 3}


class EinsumProbe(nn.Module):
    """``x -> linear (b s h) -> einsum(equation, h, W) -> flatten -> linear -> mean over s``."""

    def __init__(self, equation: str, weight_letters: str, out_width: int):
        super().__init__()
        self.equation = equation
        self.a = nn.Linear(5, SIZES["h"])
        self.w = nn.Parameter(torch.randn(*(SIZES[c] for c in weight_letters)))
        self.head = nn.Linear(out_width, 3)

    def forward(self, x):
        y = torch.einsum(self.equation, torch.tanh(self.a(x)), self.w)
        return self.head(torch.tanh(y.flatten(2))).mean(1)


@st.composite
def equations(draw):
    weight = draw(st.permutations("hpq").map("".join).flatmap(lambda s: st.sampled_from([s[:1], s[:2], s])))
    letters = sorted(set("h" + weight))
    out = draw(st.lists(st.sampled_from(letters), min_size=1, unique=True).map("".join))
    lhs = draw(st.sampled_from(["bsh", "...h"]))
    rhs = ("..." if lhs == "...h" else "bs") + out
    width = 1
    for c in out:
        width *= SIZES[c]
    return f"{lhs},{weight}->{rhs}", weight, width


@settings(max_examples=20, deadline=None)
@given(equations(), st.integers(0, 2 ** 16))
def test_generated_einsum_permutes_soundly(case, seed):
    """Any einsum of an activation with a weight: the permuted copy computes the same function."""
    equation, weight, width = case
    torch.manual_seed(seed)
    model = EinsumProbe(equation, weight, width).eval()
    _informative(model)
    args = (torch.randn(2, 4, 5),)
    analysis = fxfuse.analyze(model, args)
    assert analysis.unruled == () and analysis.unfit_rules == ()
    # the hidden units h are free: tied through the equation, or summed on the activation alone
    (h_space,) = _spaces_of(analysis, "a.weight", 0)
    assert analysis.spaces[h_space].free
    permuted = fxfuse.permute(model, args, seed=seed)
    assert not torch.equal(permuted.a.weight, model.a.weight)
    assert compare_outputs(model, permuted, args) <= TOL, equation


def test_lstm_projection_is_a_space_of_its_own():
    """proj_size: the cell units (gates × units rows, weight_hr's columns) and the projected units (weight_hr's
    rows, fed back through weight_hh's columns and output) are two spaces per layer and direction."""
    model, args = build("lstm_projected")
    a = fxfuse.analyze(model, args)
    gate, unit = _spaces_of(a, "rnn.weight_ih_l1", 0)
    (proj,) = _spaces_of(a, "rnn.weight_hr_l1", 0)
    assert _spaces_of(a, "rnn.weight_hr_l1", 1) == [unit] and _spaces_of(a, "rnn.weight_hh_l1", 1) == [proj]
    assert a.spaces[unit].size == 10 and a.spaces[proj].size == 4 and a.spaces[unit].free and a.spaces[proj].free
    (proj_reverse,) = _spaces_of(a, "rnn.weight_hr_l1_reverse", 0)
    assert _spaces_of(a, "head.weight", 1) == [proj, proj_reverse]
