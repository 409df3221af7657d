"""A zoo of small models for the tests and benchmarks (``import zoo``; the benchmarks reach this folder through
``benchmarks/_paths.py``).

Every factory takes an optional ``seed`` and returns ``(module, example_args)``
with the module in eval mode and random weights drawn from that seed. Hugging
Face architectures are built from tiny configs (no download); each carries a
head (classification or LM) so that its residual stream is internal, not a
returned output.
"""
from __future__ import annotations

import torch
from torch import nn

BATCH, SEQ, VOCAB, IMAGE = 2, 8, 97, 32


def _ids(vocab: int = VOCAB) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randint(0, vocab, (BATCH, SEQ), generator=g)


def _pixels(channels: int = 3, size: int = IMAGE) -> torch.Tensor:
    g = torch.Generator().manual_seed(1234)
    return torch.randn(BATCH, channels, size, size, generator=g)


def _seeded(seed: int) -> None:
    torch.manual_seed(seed)


# ---------------------------------------------------------------- plain torch.nn


class MLP(nn.Module):
    """``in -> hidden... -> out`` with ReLU, the OTFusion MNIST shape in small."""

    def __init__(self, sizes=(64, 48, 32, 10)):
        super().__init__()
        layers = []
        for i, (a, b) in enumerate(zip(sizes[:-1], sizes[1:])):
            layers.append(nn.Linear(a, b))
            if i < len(sizes) - 2:
                layers.append(nn.ReLU())
        self.net = nn.Sequential(*layers)

    def forward(self, x):
        return self.net(x.flatten(1))


class ResidualCNN(nn.Module):
    """Conv + BatchNorm stem, two residual blocks, global pooling, linear head."""

    def __init__(self, width: int = 16, classes: int = 10):
        super().__init__()
        self.stem = nn.Sequential(nn.Conv2d(3, width, 3, padding=1), nn.BatchNorm2d(width), nn.ReLU())
        self.blocks = nn.ModuleList(
            nn.Sequential(
                nn.Conv2d(width, 2 * width, 3, padding=1, bias=False),
                nn.BatchNorm2d(2 * width),
                nn.ReLU(),
                nn.Conv2d(2 * width, width, 3, padding=1, bias=False),
                nn.BatchNorm2d(width),
            )
            for _ in range(2)
        )
        self.head = nn.Linear(width, classes)

    def forward(self, x):
        h = self.stem(x)
        for block in self.blocks:
            h = torch.relu(h + block(h))
        return self.head(h.mean(dim=(2, 3)))


class MHAClassifier(nn.Module):
    """Token embedding, one ``nn.MultiheadAttention`` with a residual, mean-pooled head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.attn = nn.MultiheadAttention(dim, heads, batch_first=True)
        self.norm = nn.LayerNorm(dim)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.embed(ids)
        a, _ = self.attn(h, h, h, need_weights=False)
        h = self.norm(h + a)
        return self.head(h.mean(dim=1))


class EncoderClassifier(nn.Module):
    """Token + position embedding, ``nn.TransformerEncoder`` layers, classification head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, layers: int = 2, classes: int = 5):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.pos = nn.Parameter(torch.randn(1, 64, dim) * 0.02)
        layer = nn.TransformerEncoderLayer(dim, heads, 2 * dim, dropout=0.0, batch_first=True)
        self.encoder = nn.TransformerEncoder(layer, layers, enable_nested_tensor=False)
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.embed(ids) + self.pos[:, : ids.shape[1]]
        return self.head(self.encoder(h)[:, 0])


class EinsumAttentionClassifier(nn.Module):
    """Token embedding, one attention block written with ``torch.einsum``, an einsum MLP, mean-pooled head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, classes: int = 5):
        super().__init__()
        self.heads = heads
        self.embed = nn.Embedding(vocab, dim)
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.up = nn.Parameter(torch.randn(2 * dim, dim))
        self.down = nn.Parameter(torch.randn(dim, 2 * dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.embed(ids)
        b, s, d = h.shape
        q, k, v = self.qkv(h).view(b, s, 3, self.heads, d // self.heads).unbind(2)
        scores = torch.einsum("bqhd,bkhd->bhqk", q, k) * (d // self.heads) ** -0.5
        a = torch.einsum("bhqk,bkhd->bqhd", scores.softmax(-1), v)
        h = h + self.out(a.reshape(b, s, d))
        h = h + torch.einsum("bsf,df->bsd", torch.einsum("bsd,fd->bsf", h, self.up).relu(), self.down)
        return self.head(h.mean(1))


class MQAClassifier(nn.Module):
    """Multi-query attention: one key/value head that ``scaled_dot_product_attention`` broadcasts over the query
    heads; pre-norm blocks with ``nn.RMSNorm``."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, classes: int = 5):
        super().__init__()
        self.heads, self.hd = heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.kv = nn.Linear(dim, 2 * self.hd)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.embed(ids)
        b, s, _ = h.shape
        x = self.norm1(h)
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k, v = self.kv(x).view(b, s, 1, 2 * self.hd).transpose(1, 2).chunk(2, dim=-1)
        a = nn.functional.scaled_dot_product_attention(q, k, v)
        h = h + self.o(a.transpose(1, 2).reshape(b, s, -1))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


class GQAClassifier(nn.Module):
    """Grouped-query attention without rotary embeddings: 8 query heads over 4 key/value heads, the keys and
    values repeated to the query heads by ``repeat_interleave`` (query head ``h`` reads key/value head ``h // 2``);
    pre-norm blocks with ``nn.RMSNorm``."""

    def __init__(self, vocab: int = VOCAB, dim: int = 64, heads: int = 8, kv_heads: int = 4, classes: int = 5):
        super().__init__()
        self.heads, self.kv_heads, self.hd = heads, kv_heads, dim // heads
        self.embed = nn.Embedding(vocab, dim)
        self.norm1, self.norm2 = nn.RMSNorm(dim), nn.RMSNorm(dim)
        self.q = nn.Linear(dim, dim)
        self.k = nn.Linear(dim, kv_heads * self.hd)
        self.v = nn.Linear(dim, kv_heads * self.hd)
        self.o = nn.Linear(dim, dim)
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.embed(ids)
        b, s, _ = h.shape
        x = self.norm1(h)
        group = self.heads // self.kv_heads
        q = self.q(x).view(b, s, self.heads, self.hd).transpose(1, 2)
        k = self.k(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2).repeat_interleave(group, dim=1)
        v = self.v(x).view(b, s, self.kv_heads, self.hd).transpose(1, 2).repeat_interleave(group, dim=1)
        a = nn.functional.scaled_dot_product_attention(q, k, v, is_causal=True)
        h = h + self.o(a.transpose(1, 2).reshape(b, s, -1))
        h = h + self.mlp(self.norm2(h))
        return self.head(h.mean(1))


class RecurrentClassifier(nn.Module):
    """Token embedding, an ``nn.LSTM`` or ``nn.GRU`` (packed gate weights), mean-pooled linear head."""

    def __init__(self, cell: str, vocab: int = VOCAB, dim: int = 16, hidden: int = 24, classes: int = 5,
                 bidirectional: bool = False):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.rnn = (nn.LSTM if cell == "lstm" else nn.GRU)(dim, hidden, batch_first=True,
                                                           bidirectional=bidirectional)
        self.head = nn.Linear(hidden * (2 if bidirectional else 1), classes)

    def forward(self, ids):
        out, _ = self.rnn(self.embed(ids))
        return self.head(out.mean(1))


class HeadBiasAttention(nn.Module):
    """Attention with 3-D projections ``(dim, heads, head_dim)``, a content bias per head and dim (as in
    XLNet) and per-dim scales shared by all heads, so heads and head dims are separate spaces and no
    tensor carries heads alone."""

    def __init__(self, dim: int = 32, heads: int = 4, head_dim: int = 8):
        super().__init__()
        self.q, self.k, self.v = (nn.Parameter(torch.randn(dim, heads, head_dim)) for _ in range(3))
        self.o = nn.Parameter(torch.randn(heads, head_dim, dim))
        self.content_bias = nn.Parameter(torch.randn(heads, head_dim))
        self.q_scale = nn.Parameter(torch.ones(head_dim))
        self.v_scale = nn.Parameter(torch.ones(head_dim))
        self.norm = nn.LayerNorm(dim)

    def forward(self, x):
        b, n, c = x.shape
        heads, d = self.q.shape[1:]
        q, k, v = ((x @ w.reshape(c, heads * d)).view(b, n, heads, d).transpose(1, 2)
                   for w in (self.q, self.k, self.v))
        q = (q + self.content_bias[:, None]) * self.q_scale
        att = torch.softmax(q @ k.transpose(-1, -2) * d ** -0.5, dim=-1)
        a = (att @ (v * self.v_scale)).transpose(1, 2).reshape(b, n, heads * d)
        return self.norm(x + a @ self.o.reshape(heads * d, c))


class HeadBiasClassifier(nn.Module):
    """Token embedding, two ``HeadBiasAttention`` layers, an MLP, a mean-pooled head."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, layers: int = 2, classes: int = 3):
        super().__init__()
        self.embed = nn.Embedding(vocab, dim)
        self.layers = nn.ModuleList(HeadBiasAttention(dim) for _ in range(layers))
        self.mlp = nn.Sequential(nn.Linear(dim, 2 * dim), nn.GELU(), nn.Linear(2 * dim, dim))
        self.head = nn.Linear(dim, classes)

    def forward(self, ids):
        h = self.embed(ids)
        for layer in self.layers:
            h = layer(h)
        return self.head((h + self.mlp(h)).mean(dim=1))


class Seq2Seq(nn.Module):
    """Encoder-decoder on two token inputs: embeddings, ``nn.Transformer``, an LM head on the decoder."""

    def __init__(self, vocab: int = VOCAB, dim: int = 32, heads: int = 4, layers: int = 2):
        super().__init__()
        self.src_embed = nn.Embedding(vocab, dim)
        self.tgt_embed = nn.Embedding(vocab, dim)
        self.transformer = nn.Transformer(dim, heads, layers, layers, 2 * dim, dropout=0.0, batch_first=True)
        self.head = nn.Linear(dim, vocab)

    def forward(self, src, tgt):
        return self.head(self.transformer(self.src_embed(src), self.tgt_embed(tgt)))


class ChannelShuffle(nn.Module):
    """A stem, then ``cat([a(h), b(h)])`` viewed as ``(2, C)``, transposed to ``(C, 2)`` and flattened (a channel
    shuffle) before the head: a concatenated axis meeting a reshape, whose two views must both stay pinned."""

    def __init__(self, c: int = 6, width: int = 32):
        super().__init__()
        self.c = c
        self.stem = nn.Sequential(nn.Linear(16, width), nn.ReLU(), nn.Linear(width, width), nn.ReLU())
        self.a, self.b = nn.Linear(width, c), nn.Linear(width, c)
        self.head = nn.Linear(2 * c, 10)

    def forward(self, x):
        h = self.stem(x)
        y = torch.cat([self.a(h), self.b(h)], 1)
        y = y.view(-1, 2, self.c).transpose(1, 2).reshape(-1, 2 * self.c)
        return self.head(torch.relu(y))


class GroupedConvs(nn.Module):
    """1×1 convolutions with ``groups`` per layer: 2 then 4 gives groups nested inside groups."""

    def __init__(self, groups=(2, 4), width: int = 16):
        super().__init__()
        self.stem = nn.Conv2d(3, width, 1)
        self.convs = nn.ModuleList(nn.Conv2d(width, width, 1, groups=g) for g in groups)
        self.head = nn.Linear(width, 5)

    def forward(self, x):
        h = torch.relu(self.stem(x))
        for conv in self.convs:
            h = torch.relu(conv(h))
        return self.head(h.mean((2, 3)))


class NoGradBlock(nn.Module):
    """A residual MLP block under ``torch.no_grad()``: its hidden units live only inside a subgraph."""

    def __init__(self):
        super().__init__()
        self.a, self.b1, self.b2, self.c = nn.Linear(16, 32), nn.Linear(32, 24), nn.Linear(24, 32), nn.Linear(32, 5)

    def forward(self, x):
        h = torch.relu(self.a(x))
        with torch.no_grad():
            h = h + self.b2(torch.relu(self.b1(h)))
        return self.c(h)


WINDOW, WINDOW_DIM, WINDOW_HEADS = 3, 8, 2


class RelativeBias(nn.Module):
    """Attention over ``WINDOW²`` tokens plus a bias gathered from a table by a saved index buffer.

    ``bias[h, i, j] = table[index[i, j], h]`` with ``index`` an integer ``(T, T)`` buffer
    (persistent: saved with the model), as in Swin-style relative position bias.
    ``gather``: ``"index"`` (``table[index.view(-1)]``) or ``"index_select"``.
    """

    def __init__(self, gather: str = "index"):
        super().__init__()
        self.gather = gather
        w, dim, heads = WINDOW, WINDOW_DIM, WINDOW_HEADS
        self.table = nn.Parameter(torch.randn((2 * w - 1) ** 2, heads))
        coords = torch.stack(torch.meshgrid(torch.arange(w), torch.arange(w), indexing="ij")).flatten(1)
        rel = (coords[:, :, None] - coords[:, None, :]).permute(1, 2, 0) + (w - 1)
        self.register_buffer("index", rel[..., 0] * (2 * w - 1) + rel[..., 1])  # (T, T) int64
        self.qkv = nn.Linear(dim, 3 * dim)
        self.out = nn.Linear(dim, dim)
        self.head = nn.Linear(w * w * dim, 3)

    def forward(self, x):  # x: (B, T, dim)
        b, t, dim = x.shape
        q, k, v = self.qkv(x).view(b, t, 3, WINDOW_HEADS, dim // WINDOW_HEADS).permute(2, 0, 3, 1, 4)
        flat = self.index.view(-1)
        rows = self.table[flat] if self.gather == "index" else torch.index_select(self.table, 0, flat)
        bias = rows.view(t, t, WINDOW_HEADS).permute(2, 0, 1)
        scores = q @ k.transpose(-1, -2) + bias
        y = (scores.softmax(-1) @ v).transpose(1, 2).reshape(b, t, dim)
        return self.head(torch.relu(self.out(y)).flatten(1))


def _made(build, seed: int, args: tuple):
    """``build()`` with weights drawn from ``seed`` and redrawn by ``_informative``, in eval mode, and ``args``."""
    _seeded(seed)
    model = build()
    _informative(model)
    return model.eval(), args


def channel_shuffle(seed: int = 0):
    return _made(ChannelShuffle, seed, (torch.randn(BATCH, 16, generator=torch.Generator().manual_seed(1234)),))


def grouped_convs(seed: int = 0, groups=(2, 4)):
    return _made(lambda: GroupedConvs(groups), seed, (_pixels(size=4),))


def no_grad_block(seed: int = 0):
    return _made(NoGradBlock, seed, (torch.randn(BATCH, 16, generator=torch.Generator().manual_seed(1234)),))


def relative_bias(seed: int = 0, gather: str = "index"):
    return _made(lambda: RelativeBias(gather), seed,
                 (torch.randn(BATCH, WINDOW * WINDOW, WINDOW_DIM, generator=torch.Generator().manual_seed(1234)),))


def mlp(seed: int = 0):
    _seeded(seed)
    return MLP().eval(), (torch.randn(BATCH, 64, generator=torch.Generator().manual_seed(1234)),)


def cnn(seed: int = 0):
    return _made(ResidualCNN, seed, (_pixels(),))


def mha(seed: int = 0):
    return _made(MHAClassifier, seed, (_ids(),))


def seq2seq(seed: int = 0):
    """Two inputs, source and target token ids of different lengths."""
    g = torch.Generator().manual_seed(1234)
    return _made(Seq2Seq, seed, (torch.randint(0, VOCAB, (BATCH, SEQ), generator=g),
                                 torch.randint(0, VOCAB, (BATCH, SEQ - 2), generator=g)))


def head_bias(seed: int = 0):
    return _made(HeadBiasClassifier, seed, (_ids(),))


def encoder(seed: int = 0):
    return _made(EncoderClassifier, seed, (_ids(),))


def einsum_attention(seed: int = 0):
    return _made(EinsumAttentionClassifier, seed, (_ids(),))


def mqa(seed: int = 0):
    return _made(MQAClassifier, seed, (_ids(),))


def gqa(seed: int = 0):
    return _made(GQAClassifier, seed, (_ids(),))


def lstm(seed: int = 0):
    return _made(lambda: RecurrentClassifier("lstm"), seed, (_ids(),))


def gru(seed: int = 0):
    return _made(lambda: RecurrentClassifier("gru", bidirectional=True), seed, (_ids(),))


@torch.no_grad()
def _informative(model: nn.Module) -> None:
    """Redraw weights so that every parameter matters to the output.

    Library inits leave biases at 0, norm scales at 1 and layer scales at 1e-6,
    and draw matrices with std 0.02: a permutation that forgot a bias, or broke
    a query/key tie, would then change outputs by less than a test tolerance.
    Matrices get std ``1/√fan_in``; constant vectors get Gaussian noise.
    """
    for name, p in model.named_parameters():
        if p.dim() >= 2:
            fan_in = p[0].numel()
            p.normal_(0.0, fan_in ** -0.5)
        elif p.numel() > 1 and bool((p == p.flatten()[0]).all()):
            base = 1.0 if float(p.flatten()[0]) != 0.0 else 0.0
            p.copy_(base + 0.2 * torch.randn_like(p))
    _randomise_norm_stats(model)


def _randomise_norm_stats(model: nn.Module) -> None:
    """Give BatchNorm layers non-trivial running statistics and affine weights."""
    for m in model.modules():
        if isinstance(m, nn.modules.batchnorm._BatchNorm):
            m.running_mean.normal_(0, 0.5)
            m.running_var.uniform_(0.5, 2.0)
            m.weight.data.uniform_(0.5, 1.5)
            m.bias.data.normal_(0, 0.2)


# ---------------------------------------------------------------- Hugging Face


def _hf(cls_name: str, config, seed: int, args):
    import transformers

    return _made(lambda: getattr(transformers, cls_name)(config), seed, args)


def bert(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4):
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                     intermediate_size=2 * hidden, max_position_embeddings=64, num_labels=3)
    return _hf("BertForSequenceClassification", cfg, seed, (_ids(),))


def bert_mlm(seed: int = 0):
    from transformers import BertConfig

    cfg = BertConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, max_position_embeddings=64, tie_word_embeddings=True)
    return _hf("BertForMaskedLM", cfg, seed, (_ids(),))


def roberta(seed: int = 0):
    from transformers import RobertaConfig

    cfg = RobertaConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=64, num_labels=3, pad_token_id=1)
    return _hf("RobertaForSequenceClassification", cfg, seed, (_ids() + 2,))


def distilbert(seed: int = 0):
    from transformers import DistilBertConfig

    cfg = DistilBertConfig(vocab_size=VOCAB, dim=32, n_layers=2, n_heads=4, hidden_dim=64,
                           max_position_embeddings=64, num_labels=3)
    return _hf("DistilBertForSequenceClassification", cfg, seed, (_ids(),))


def gpt2(seed: int = 0):
    from transformers import GPT2Config

    cfg = GPT2Config(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return _hf("GPT2LMHeadModel", cfg, seed, (_ids(),))


def gpt_bigcode(seed: int = 0):
    """Multi-query attention: one key/value head shared by all query heads, whose queries are
    folded into the sequence for the score product, so query heads and head dims are separate
    spaces of the same activations."""
    from transformers import GPTBigCodeConfig

    cfg = GPTBigCodeConfig(vocab_size=VOCAB, n_embd=32, n_layer=2, n_head=4, n_positions=64, multi_query=True,
                           use_cache=False, bos_token_id=0, eos_token_id=0)
    return _hf("GPTBigCodeForCausalLM", cfg, seed, (_ids(),))


def llama(seed: int = 0):
    from transformers import LlamaConfig

    cfg = LlamaConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    return _hf("LlamaForCausalLM", cfg, seed, (_ids(),))


def qwen2(seed: int = 0):
    from transformers import Qwen2Config

    cfg = Qwen2Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                      num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False)
    return _hf("Qwen2ForCausalLM", cfg, seed, (_ids(),))


class T5EncoderClassifier(nn.Module):
    """HF ``T5EncoderModel`` with a mean-pooled linear head (T5 has no encoder-only head of its own)."""

    def __init__(self, config, classes: int = 3):
        super().__init__()
        from transformers import T5EncoderModel

        self.encoder = T5EncoderModel(config)
        self.head = nn.Linear(config.d_model, classes)

    def forward(self, ids):
        return self.head(self.encoder(input_ids=ids).last_hidden_state.mean(dim=1))


def t5(seed: int = 0):
    from transformers import T5Config

    cfg = T5Config(vocab_size=VOCAB, d_model=32, d_kv=8, d_ff=64, num_layers=2, num_heads=4,
                   use_cache=False)
    return _made(lambda: T5EncoderClassifier(cfg), seed, (_ids(),))


def vit(seed: int = 0, layers: int = 2, hidden: int = 32, heads: int = 4):
    from transformers import ViTConfig

    cfg = ViTConfig(hidden_size=hidden, num_hidden_layers=layers, num_attention_heads=heads,
                    intermediate_size=2 * hidden, image_size=IMAGE, patch_size=8, num_labels=3)
    return _hf("ViTForImageClassification", cfg, seed, (_pixels(),))


def swin(seed: int = 0):
    from transformers import SwinConfig

    cfg = SwinConfig(image_size=IMAGE, patch_size=4, embed_dim=16, depths=[2, 2], num_heads=[2, 4],
                     window_size=4, num_labels=3)
    return _hf("SwinForImageClassification", cfg, seed, (_pixels(),))


def convnext(seed: int = 0):
    from transformers import ConvNextConfig

    cfg = ConvNextConfig(num_channels=3, num_stages=2, hidden_sizes=[16, 32], depths=[1, 1], num_labels=3, image_size=IMAGE)
    return _hf("ConvNextForImageClassification", cfg, seed, (_pixels(),))


def resnet(seed: int = 0):
    from transformers import ResNetConfig

    cfg = ResNetConfig(num_channels=3, embedding_size=16, hidden_sizes=[16, 32], depths=[1, 1],
                       layer_type="bottleneck", num_labels=3)
    return _hf("ResNetForImageClassification", cfg, seed, (_pixels(),))


def mobilenet_v2(seed: int = 0):
    from transformers import MobileNetV2Config

    cfg = MobileNetV2Config(num_channels=3, image_size=IMAGE, depth_multiplier=0.35, num_labels=3)
    return _hf("MobileNetV2ForImageClassification", cfg, seed, (_pixels(),))


class DonutSwinClassifier(nn.Module):
    """HF ``DonutSwinModel`` (Swin with its relative position index saved as a persistent integer buffer) with a
    linear head on the pooled output (the model has no head of its own)."""

    def __init__(self, config, classes: int = 3):
        super().__init__()
        from transformers import DonutSwinModel

        self.swin = DonutSwinModel(config)
        self.head = nn.Linear(self.swin.num_features, classes)

    def forward(self, pixels):
        return self.head(self.swin(pixels).pooler_output)


def donut_swin(seed: int = 0):
    from transformers import DonutSwinConfig

    cfg = DonutSwinConfig(image_size=16, patch_size=4, embed_dim=8, depths=[1, 1], num_heads=[2, 2], window_size=2)
    return _made(lambda: DonutSwinClassifier(cfg), seed, (_pixels(size=16),))


def levit(seed: int = 0):
    """Attention biases gathered by an index buffer (cached in eval mode), one subsample attention over a
    stride-2 grid, BatchNorm'd linears, hardswish; 64×64 images give a 4×4, then a 2×2 grid."""
    from transformers import LevitConfig

    cfg = LevitConfig(image_size=64, patch_size=16, hidden_sizes=[16, 24], num_attention_heads=[2, 3], depths=[1, 1],
                      key_dim=[4, 4], mlp_ratio=[2, 2], attention_ratio=[2, 2], down_ops=[["Subsample", 4, 4, 2, 2, 2]],
                      num_labels=3)
    return _hf("LevitForImageClassification", cfg, seed, (_pixels(size=64),))


def squeezebert(seed: int = 0):
    """1×1 grouped convolutions of 2 and 4 groups in attention and feed-forward (groups inside groups)."""
    from transformers import SqueezeBertConfig

    cfg = SqueezeBertConfig(vocab_size=VOCAB, hidden_size=32, embedding_size=32, num_hidden_layers=2,
                            num_attention_heads=4, intermediate_size=64, max_position_embeddings=64, num_labels=3,
                            q_groups=2, k_groups=2, v_groups=2, post_attention_groups=2, intermediate_groups=4,
                            output_groups=2)
    return _hf("SqueezeBertForSequenceClassification", cfg, seed, (_ids(),))


def mixtral(seed: int = 0):
    from transformers import MixtralConfig

    cfg = MixtralConfig(vocab_size=VOCAB, hidden_size=32, intermediate_size=48, num_hidden_layers=2,
                        num_attention_heads=4, num_key_value_heads=2, num_local_experts=4, num_experts_per_tok=2,
                        max_position_embeddings=64, use_cache=False)
    return _hf("MixtralForCausalLM", cfg, seed, (_ids(),))


class SiglipPooled(nn.Module):
    """HF ``SiglipVisionModel``, whose attention-pooling head reads a probe tiled over the batch (``aten.repeat``),
    with a linear head on the pooled output."""

    def __init__(self, config, classes: int = 3):
        super().__init__()
        from transformers import SiglipVisionModel

        self.vision = SiglipVisionModel(config)
        self.head = nn.Linear(config.hidden_size, classes)

    def forward(self, pixels):
        return self.head(self.vision(pixel_values=pixels).pooler_output)


def siglip(seed: int = 0):
    from transformers import SiglipVisionConfig

    cfg = SiglipVisionConfig(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
                             image_size=IMAGE, patch_size=8)
    return _made(lambda: SiglipPooled(cfg), seed, (_pixels(),))


def beit(seed: int = 0):
    """Relative position biases whose index is built in the forward (``meshgrid``, in-place ``copy_`` and
    ``fill_``)."""
    from transformers import BeitConfig

    cfg = BeitConfig(image_size=IMAGE, patch_size=8, hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                     intermediate_size=64, use_relative_position_bias=True, num_labels=3)
    return _hf("BeitForImageClassification", cfg, seed, (_pixels(),))


def fnet(seed: int = 0):
    """Token mixing by a 2-D Fourier transform over sequence and hidden dims (the real part kept)."""
    from transformers import FNetConfig

    cfg = FNetConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, intermediate_size=64,
                     max_position_embeddings=64, num_labels=3, use_tpu_fourier_optimizations=False)
    return _hf("FNetForSequenceClassification", cfg, seed, (_ids(),))


def phi3(seed: int = 0):
    """One fused q/k/v projection and one fused gate/up projection, cut by partial slices."""
    from transformers import Phi3Config

    cfg = Phi3Config(vocab_size=VOCAB, hidden_size=32, intermediate_size=64, num_hidden_layers=2,
                     num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=64, use_cache=False,
                     pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return _hf("Phi3ForCausalLM", cfg, seed, (_ids(),))


def jetmoe(seed: int = 0):
    """Routed experts dispatched by data-dependent counts: ``expert_size.tolist()`` cuts the sorted tokens with
    ``split_with_sizes`` (sizes ``torch.export`` knows only as unbacked symbols), each expert's rows run through
    a slice of one stacked weight, ``index_add`` scatters them back; attention experts (MoA) the same way."""
    from transformers import JetMoeConfig

    cfg = JetMoeConfig(vocab_size=VOCAB, hidden_size=32, num_hidden_layers=2, num_key_value_heads=2, kv_channels=8,
                       intermediate_size=64, num_local_experts=4, num_experts_per_tok=2, max_position_embeddings=64,
                       use_cache=False, pad_token_id=0, bos_token_id=0, eos_token_id=0)
    return _hf("JetMoeForCausalLM", cfg, seed, (_ids(),))


def efficientnet(seed: int = 0):
    """Depthwise-separable blocks with squeeze-and-excitation; deep units vary by rounding noise only (~1e-7), so
    their activation correlations follow noise, not signal.

    Not in ``ZOO``: at redrawn O(1) weights its output hardly depends on the early blocks (a broken tie there
    moves it by ~1e-7, below the tolerance), so the zoo's mutation check cannot hold for it.
    """
    from transformers import EfficientNetConfig

    cfg = EfficientNetConfig(image_size=IMAGE, width_coefficient=0.25, depth_coefficient=0.25, hidden_dim=320,
                             num_labels=5, dropout_rate=0.0, drop_connect_rate=0.0)
    return _hf("EfficientNetForImageClassification", cfg, seed, (_pixels(),))


PLAIN = {"mlp": mlp, "cnn": cnn, "mha": mha, "encoder": encoder, "einsum_attention": einsum_attention, "mqa": mqa,
         "lstm": lstm, "gru": gru, "seq2seq": seq2seq, "head_bias": head_bias, "channel_shuffle": channel_shuffle,
         "grouped_convs": grouped_convs, "no_grad_block": no_grad_block, "relative_bias": relative_bias,
         "gqa": gqa}
HF = {
    "bert": bert, "bert_mlm": bert_mlm, "roberta": roberta, "distilbert": distilbert, "gpt2": gpt2,
    "gpt_bigcode": gpt_bigcode,
    "llama": llama, "qwen2": qwen2, "t5": t5, "vit": vit, "swin": swin, "convnext": convnext,
    "resnet": resnet, "mobilenet_v2": mobilenet_v2, "donut_swin": donut_swin, "mixtral": mixtral, "levit": levit,
    "squeezebert": squeezebert, "siglip": siglip, "beit": beit, "fnet": fnet, "phi3": phi3,
    "jetmoe": jetmoe,
}
ZOO = {**PLAIN, **HF}
TRANSFORMERS = ("mha", "encoder", "seq2seq", "head_bias", "bert", "bert_mlm", "roberta", "distilbert", "gpt2",
                "gpt_bigcode", "llama", "qwen2", "t5", "vit", "swin", "einsum_attention", "mqa", "mixtral", "relative_bias",
                "donut_swin", "levit", "squeezebert", "siglip", "beit", "fnet", "phi3", "gqa", "jetmoe")
