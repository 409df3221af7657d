"""Matching by graph at GPT-2 sizes: time of each step, and the fused weights against fusing by names.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/correspondence.py [--layers 12] [--dim 768] [--vocab 50257]

Two HF GPT-2 models of random weights (seeds 0 and 1) in the given shape, and
model 1 written as the hand-written ``MiniGPT`` (``tests/handwritten.py``:
other names, ``nn.Linear`` layout, ``qkv`` chunked). Prints the time to trace
both graphs and match them, to move the source into GPT-2's class and check
it, and whether ``compile`` gives the same weights, bit for bit, as fusing
the two HF models by names (with the time of each).
"""
from __future__ import annotations

import argparse
import time

import torch

import _paths  # noqa: F401  (tests/ on the path)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--layers", type=int, default=12)
    p.add_argument("--dim", type=int, default=768)
    p.add_argument("--heads", type=int, default=12)
    p.add_argument("--vocab", type=int, default=50257)
    p.add_argument("--seq", type=int, default=32)
    args = p.parse_args()
    from transformers import GPT2Config, GPT2LMHeadModel

    import handwritten as hw
    from fxfuse.frontend.correspond import correspond
    from fxfuse.api.fuse import compile as fuse
    from fxfuse.frontend.trace import trace

    cfg = GPT2Config(vocab_size=args.vocab, n_embd=args.dim, n_layer=args.layers, n_head=args.heads,
                     n_positions=max(64, args.seq), use_cache=False, bos_token_id=0, eos_token_id=0)
    models = []
    for seed in (0, 1):
        torch.manual_seed(seed)
        models.append(GPT2LMHeadModel(cfg).eval())
    ids = (torch.randint(0, args.vocab, (2, args.seq), generator=torch.Generator().manual_seed(0)),)
    mini = hw.from_hf(models[1])
    params = sum(t.numel() for t in models[0].parameters())
    print(f"GPT-2 {args.layers} layers x {args.dim}, vocab {args.vocab}: {params / 1e6:.1f}M parameters")
    t = time.perf_counter()
    source, target = trace(mini, ids), trace(models[0], ids)
    traced = time.perf_counter() - t
    t = time.perf_counter()
    corr = correspond(source, target, ("hand-written", "hf"))
    matched = time.perf_counter() - t
    print(f"trace both: {traced:.2f}s; canonicalise and match: {matched:.2f}s; {len(corr.pieces)} pieces")
    t = time.perf_counter()
    by_names = fuse(models, ids)
    names_s = time.perf_counter() - t
    t = time.perf_counter()
    by_graph = fuse([models[0], mini], ids)
    graph_s = time.perf_counter() - t
    a, b = by_names.module.state_dict(), by_graph.module.state_dict()
    same = a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    err = by_graph.report["correspondence"]["1"]["error"]
    print(f"compile by names (two HF models): {names_s:.1f}s; by graph (HF + hand-written): {graph_s:.1f}s; "
          f"conversion self-check error {err:.1e}; same fused weights bit for bit: {same}")


if __name__ == "__main__":
    main()
