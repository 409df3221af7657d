"""GPT-2 pairs whose vocabularies overlap partly: rows matched by token string against rows matched by id.

    python benchmarks/vocab.py [--overlaps 50,70,90,100] [--eval 256] [--json FILE] [--retrain]

Corpus, model size, training and the target model A come from ``benchmarks/text.py`` (GPT-2 seed 1, its
byte-level vocabulary of 260 tokens: bytes 0–255, then [PAD], [MASK], [CLS], [SEP]; cached under
``benchmarks/.cache/text/``). For an overlap ``p`` model B (seed 2) gets a vocabulary of the same size:
``round(p · 260)`` of A's tokens (at 100 %: all of them), drawn at random (seed ``VOCAB_SEED``), then
``[UNK]`` and the most frequent byte pairs of the training text, so ``|A ∩ B| / |A| = p``; B's token ids are
a random order of them. B encodes text greedily from the left: a byte pair of its vocabulary is one token, else
a byte it has, else ``[UNK]``. B is trained from scratch on the training text in its own tokens with the
same recipe as A (cached under ``benchmarks/.cache/vocab/``).

``B alone`` is B's held-out loss in its own tokens, in nats per byte (the summed loss over the bytes its
predicted tokens stand for). Every fused model is scored on ``--eval`` held-out windows in A's tokens
(bytes: the loss is in nats per byte), with the whole output vocabulary in the softmax:

* ``target A``: the target alone;
* ``rows by id, vanilla``: the plain average, rows paired by id (what a merge that ignores the tokenizers
  gives: the two vocabularies have the same size);
* ``rows by id, fxfuse``: aligned by weight matching, rows paired by id;
* ``vocab target, vanilla``: rows matched by token string (the target's vocabulary), no alignment;
* ``vocab target, fxfuse``: rows matched by token string, aligned on the shared rows (``vocab="target"``);
* ``vocab union, fxfuse``: the same into the union vocabulary (``vocab="union"``; B's other tokens added);
* ``vocab target, fxfuse groups full``: orthogonal residual streams (``groups="full", untie=True``);
* ``vocab target, fxfuse + refine``: the maps refined for ``REFINE_STEPS`` steps on training windows in A's
  tokens (``fxfuse.backend.refine``; the interpolation it trains on mixes vocabulary rows per row).

fxfuse: weight matching, exact solver, ``seed=0``, uniform weights. The self-check of every fusion must pass
(each moved model computes what it did on shared tokens), and the union model with its softmax cut to A's
tokens must score as the target-vocabulary model (the alignment reads shared rows only, so both are one model
on A's tokens).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import sys
import time
from collections import Counter
from pathlib import Path

import torch

HERE = Path(__file__).resolve().parent
sys.path.insert(0, str(HERE))

import text  # noqa: E402  (the text benchmark: corpus, GPT-2 config, training, cache)

import fxfuse  # noqa: E402
from fxfuse.models.heads import evaluate  # noqa: E402

CACHE = HERE / ".cache" / "vocab"
VOCAB_SEED = 2024
SEED_A, SEED_B = 1, 2
SPECIALS = {text.PAD: "[PAD]", text.MASK: "[MASK]", text.CLS: "[CLS]", text.SEP: "[SEP]"}
ROWS = ("B alone (own tokens)", "target A", "rows by id, vanilla", "rows by id, fxfuse", "vocab target, vanilla",
        "vocab target, fxfuse",
        "vocab union, fxfuse", "vocab target, fxfuse groups full", "vocab target, fxfuse + refine")


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def name(token) -> str:
    """A token's string: ``<0a>`` for a byte, ``<2020>`` for a byte pair, ``[SEP]`` for a special token."""
    if isinstance(token, tuple):
        return "<" + "".join(f"{b:02x}" for b in token) + ">"
    return SPECIALS.get(token, f"<{token:02x}>")


def vocab_a() -> list[str]:
    return [name(i) for i in range(text.VOCAB)]


def vocab_b(overlap: float, stream: torch.Tensor) -> tuple[list, list[str]]:
    """B's tokens (ints of A's ids, ``"[UNK]"``, byte-pair tuples) in B's id order, and their strings."""
    n = text.VOCAB
    g = torch.Generator().manual_seed(VOCAB_SEED)
    kept = sorted(torch.randperm(n, generator=g)[: round(overlap * n)].tolist())
    s = stream.tolist()
    pairs = Counter(zip(s, s[1:]))
    frequent = [p for p, _ in sorted(pairs.items(), key=lambda kv: (-kv[1], kv[0])) if p[0] < 256 and p[1] < 256]
    new = ["[UNK]"] + frequent[: n - len(kept) - 1] if len(kept) < n else []
    tokens = kept + new
    order = torch.randperm(len(tokens), generator=g).tolist()
    tokens = [tokens[i] for i in order]
    return tokens, [t if t == "[UNK]" else name(t) for t in tokens]


def encode_b(stream: torch.Tensor, tokens: list) -> torch.Tensor:
    """Greedy left-to-right: a byte pair of B's vocabulary, else a token B has, else ``[UNK]``."""
    ids = {t: i for i, t in enumerate(tokens)}
    unk, s, out, i = ids.get("[UNK]"), stream.tolist(), [], 0
    while i < len(s):
        pair = (s[i], s[i + 1]) if i + 1 < len(s) else None
        if pair in ids:
            out.append(ids[pair])
            i += 2
        else:
            out.append(ids.get(s[i], unk))
            i += 1
    return torch.tensor(out, dtype=torch.long)


def trained_b(overlap: float, corpus: dict, retrain: bool) -> tuple[torch.nn.Module, list[str], dict]:
    tokens, strings = vocab_b(overlap, corpus["train"])
    key = json.dumps({"overlap": overlap, "seed": SEED_B, "vocab_seed": VOCAB_SEED, "config": text.CONFIG,
                      "train": text.TRAIN, "seq": text.SEQ, "corpus": corpus["info"]["sha1"],
                      "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    path = CACHE / f"gpt2_b{round(overlap * 100)}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"
    if path.exists() and not retrain:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model = text.build("gpt2", SEED_B)
        model.load_state_dict(blob["state"], strict=True)
        return model.eval(), strings, {**blob["info"], "cached": True}
    stream = encode_b(corpus["train"], tokens)
    log(f"training B for overlap {overlap:.0%} ({text.TRAIN['steps']} steps, {len(stream)} tokens)")
    model, info = text.train("gpt2", SEED_B, stream)
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": model.state_dict(), "info": info}, tmp)
    tmp.replace(path)
    return model, strings, {**info, "cached": False}


def loss_b(b: torch.nn.Module, overlap: float, corpus: dict, n: int) -> float:
    """B's held-out loss in its own tokens, in nats per byte: ``n`` windows of the held-out text as B encodes
    it, the summed loss of the predicted tokens over the bytes they stand for."""
    tokens, _ = vocab_b(overlap, corpus["train"])
    xb = text.evenly(encode_b(corpus["held_out"], tokens), n)
    per_token = evaluate(b, xb, xb.clone(), "causal")[0]
    width = torch.tensor([len(t) if isinstance(t, tuple) else 1 for t in tokens])
    predicted = xb[:, 1:]
    return per_token * predicted.numel() / float(width[predicted].sum())


REFINE_STEPS, REFINE_WINDOWS = 300, 4096


def refine_config(corpus: dict):
    """Refinement of the maps on training windows in A's tokens (``text.REFINE_SEED``), ``REFINE_STEPS`` steps."""
    from fxfuse.backend.refine import RefineConfig

    g = torch.Generator().manual_seed(text.REFINE_SEED)
    x = text.windows(corpus["train"], torch.randint(0, len(corpus["train"]) - text.SEQ, (REFINE_WINDOWS,), generator=g))
    return RefineConfig(REFINE_STEPS, x, x.clone(), head="causal", lr=text.REFINE["lr"],
                        batch_size=text.REFINE["batch"])


def run_overlap(overlap: float, a: torch.nn.Module, corpus: dict, x: torch.Tensor, args) -> dict:
    b, strings_b, info = trained_b(overlap, corpus, args.retrain)
    words_a = vocab_a()
    example = (x[:2].clone(),)
    score = lambda m: evaluate(m, x, x.clone(), "causal")[0]  # noqa: E731
    runs = {"target A": None,
            "rows by id, vanilla": {"method": "vanilla"},
            "rows by id, fxfuse": {},
            "vocab target, vanilla": {"method": "vanilla", "vocab": "target"},
            "vocab target, fxfuse": {"vocab": "target"},
            "vocab union, fxfuse": {"vocab": "union"},
            "vocab target, fxfuse groups full": {"vocab": "target", "groups": "full", "untie": True},
            "vocab target, fxfuse + refine": {"vocab": "target", "refine": refine_config(corpus)}}
    out = {"overlap": overlap, "shared": len(set(words_a) & set(strings_b)), "train_b": info, "loss": {},
           "seconds": {}}
    out["loss"]["B alone (own tokens)"] = loss_b(b, overlap, corpus, args.eval)
    fused = {}
    for row, options in runs.items():
        t0 = time.perf_counter()
        if options is None:
            model = a
        else:
            if "vocab" in options:
                options = dict(options, vocabularies=[words_a, strings_b])
            result = fxfuse.compile([a, b], example, seed=0, **options)
            model = fused[row] = result.module
            checks = result.report["self_check"]
            if any(c.get("error", 0.0) > 1e-4 for c in checks):
                raise SystemExit(f"overlap {overlap:.0%} {row}: self-check failed {checks}")
            if "vocab" in result.report:
                out.setdefault("vocab", {})[options["vocab"]] = result.report["vocab"]
        out["loss"][row] = score(model)
        out["seconds"][row] = time.perf_counter() - t0
        log(f"overlap {overlap:.0%} {row}: held-out loss {out['loss'][row]:.4f} ({out['seconds'][row]:.1f} s)")
    # the union model, its softmax cut to A's tokens, is the target-vocabulary model: same alignment, same rows
    cut = evaluate(_Cut(fused["vocab union, fxfuse"], text.VOCAB), x, x.clone(), "causal")[0]
    if abs(cut - out["loss"]["vocab target, fxfuse"]) > 1e-4:
        raise SystemExit(f"overlap {overlap:.0%}: the union model cut to A's tokens scores {cut:.6f}, the "
                         f"target-vocabulary model {out['loss']['vocab target, fxfuse']:.6f}")
    return out


class _Cut(torch.nn.Module):
    """A causal LM's logits over its first ``n`` tokens only."""

    def __init__(self, model: torch.nn.Module, n: int):
        super().__init__()
        self.model, self.n = model, n

    def forward(self, input_ids):
        return self.model(input_ids=input_ids).logits[..., : self.n]


def table(results: list[dict]) -> str:
    head = "| fused model | " + " | ".join(f"overlap {r['overlap']:.0%} ({r['shared']} shared)" for r in results) + " |"
    lines = [head, "|---|" + "---|" * len(results)]
    for row in ROWS:
        lines.append(f"| {row} | " + " | ".join(f"{r['loss'][row]:.4f}" for r in results) + " |")
    return "\n".join(lines)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    p.add_argument("--overlaps", default="50,70,90,100", help="overlaps of B's vocabulary with A's, in percent")
    p.add_argument("--eval", type=int, default=256, help="held-out windows scored")
    p.add_argument("--json", metavar="FILE", help="write every figure here")
    p.add_argument("--retrain", action="store_true", help="ignore the cached models")
    p.add_argument("--threads", type=int, default=1)
    args = p.parse_args(argv)
    torch.set_num_threads(args.threads)
    corpus = text.load_corpus()
    a, _info = text.trained("gpt2", SEED_A, corpus, args.retrain)
    x = text.evenly(corpus["held_out"], args.eval)
    results = [run_overlap(int(o) / 100, a, corpus, x, args) for o in args.overlaps.split(",")]
    print(f"Held-out loss (nats per byte, {args.eval} windows of {text.SEQ} bytes, A's tokens) of GPT-2 A "
          f"(seed {SEED_A}) fused with B (seed {SEED_B}, own vocabulary of {text.VOCAB} tokens):")
    print(table(results))
    if args.json:
        Path(args.json).write_text(json.dumps({"results": results, "eval": args.eval}, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
