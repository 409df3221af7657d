"""Loss barriers of small language models trained on real text: vanilla vs fxfuse.

    python benchmarks/text.py [--pairs 3] [--models bert,gpt2] [--json FILE] [--retrain] [--threads 2]

Corpus: the Python standard library's own ``*.py`` sources (``sysconfig``'s
``stdlib`` path, recursively; directories ``test``, ``tests``, ``idlelib`` and
``site-packages`` skipped), split **by file**: a file is held out when the
SHA-1 of its path relative to the stdlib root is 0 mod ``HELD_OUT_MOD``. Paths
are sorted; each file contributes at most ``FILE_CAP`` bytes and each split at
most ``TRAIN_CAP`` / ``HELD_OUT_CAP`` bytes (files joined by a [SEP] token).

Tokenizer: byte-level (ids 0–255 are the UTF-8 bytes, then [PAD], [MASK],
[CLS], [SEP]); nothing is learnt or downloaded. Sequences are ``SEQ`` tokens.

Models (random init from small configs via transformers, dropout 0):
``BertForMaskedLM`` (tied embeddings) and ``GPT2LMHeadModel`` (``use_cache=False``),
see ``CONFIG``. Pair ``i`` is seeds ``(2i+1, 2i+2)``; the seed fixes the init,
the order of the training windows and the MLM masks. Training: AdamW for a fixed
number of steps on random windows of the training stream, linear warm-up then
cosine decay, gradient clipping at 1. MLM: 15 % of positions chosen (80 % [MASK],
10 % random byte, 10 % kept), labels -100 elsewhere; causal LM: labels = inputs.
Trained models are cached under ``benchmarks/.cache/text/`` (the key holds every
setting and a hash of the corpus); ``--retrain`` ignores the cache.

Barriers (``fxfuse.barrier``, ``--points`` λ values, the held-out set: ``--eval``
windows evenly spaced over the held-out stream, MLM masks from the fixed seed
``EVAL_MASK_SEED`` so every model scores the same tokens), B aligned into A:

* vanilla (B as it is);
* fxfuse weights (weight matching);
* fxfuse activations (calibration: ``--calib`` *training* windows, evenly spaced,
  MLM ones masked with the fixed seed ``CALIB_MASK_SEED``);
* activations with the residual stream pinned (the space holding the word
  embedding's hidden axis, passed as ``pin=["<word embedding>:1"]``);
* activations with heads matched flat (``heads="flat"``);
* weights and activations with ``groups="full"`` (norm scales folded, the tied
  LM head untied where the last norm's scale must go into it; orthogonal
  residual streams and in-head maps), beside the same costs with permutations;
* weights, groups full, refined, with and without learnt unit scales of the
  fused model (``--refine-scales`` turns them on in every refined row);
* the same refinement on ``--sample`` sequences drawn from the two parents
  (``fxfuse.sample_sequences``, causal LMs only; cached): no text is read, so
  the row is data-free like weight matching.

``--rows`` runs a subset of these settings (row names separated by semicolons).

All use the exact solver and fxfuse ``seed=0``. Every barrier call also checks
that the two curves share their end points (an alignment must not change what
B computes) and that its vanilla curve is the same in every call.
The target of the issue: the best fxfuse setting cuts the mean vanilla barrier
by at least half. Wall times are for information only (the machine may be shared).
"""
from __future__ import annotations

import argparse
import hashlib
import json
import math
import os
import statistics
import sys
import sysconfig
import time
from pathlib import Path

import torch

import fxfuse

HERE = Path(__file__).resolve().parent
CACHE = HERE / ".cache" / "text"

# ---------------------------------------------------------------- corpus and tokenizer

SKIP_DIRS = {"test", "tests", "idlelib", "site-packages"}
HELD_OUT_MOD = 10           # a file is held out when sha1(relative path) % 10 == 0
FILE_CAP = 8_000            # bytes taken from one file (its beginning), so that every module contributes
TRAIN_CAP = 4_000_000       # bytes of training text at most
HELD_OUT_CAP = 400_000      # bytes of held-out text at most

PAD, MASK, CLS, SEP = 256, 257, 258, 259
VOCAB = 260
SEQ = 64

EVAL_MASK_SEED = 12_345
CALIB_MASK_SEED = 54_321
MASK_PROB = 0.15

# ---------------------------------------------------------------- models and training

HIDDEN, LAYERS, HEADS = 64, 2, 4
CONFIG = {"vocab": VOCAB, "hidden": HIDDEN, "layers": LAYERS, "heads": HEADS, "intermediate": 4 * HIDDEN,
          "positions": SEQ, "dropout": 0.0}
TRAIN = {"steps": 400, "batch": 32, "lr": 2e-3, "weight_decay": 0.01, "betas": (0.9, 0.98), "warmup": 0.05,
         "final_lr_factor": 0.1, "clip": 1.0}
KINDS = ("bert", "gpt2", "llama")
WORD_EMBEDDING = {"bert": "bert.embeddings.word_embeddings.weight", "gpt2": "transformer.wte.weight",
                  "llama": "model.embed_tokens.weight"}
HEAD = {"bert": "mlm", "gpt2": "causal", "llama": "causal"}
TITLE = {"bert": "BERT masked LM", "gpt2": "GPT-2 causal LM", "llama": "Llama causal LM (RoPE, grouped-query)"}
ROTARY_KINDS = ("llama",)

SETTINGS = [  # (row, compile options); calib and pin are filled in per model type
    ("fxfuse weights", {"cost": "weights"}),
    ("fxfuse activations", {"cost": "activations"}),
    ("activations, residual pinned", {"cost": "activations", "pin": "residual"}),
    ("activations, heads flat", {"cost": "activations", "heads": "flat"}),
    # learned refinement from each data-free alignment, on training windows (the held-out set only scores)
    ("fxfuse weights + refine", {"cost": "weights", "refine": True}),
    ("fxfuse activations + refine", {"cost": "activations", "refine": True}),
    ("fxfuse weights, groups full", {"cost": "weights", "groups": "full", "untie": True}),
    ("fxfuse activations, groups full", {"cost": "activations", "groups": "full", "untie": True}),
    # learned refinement over the whole groups (orthogonal streams and in-head maps), from weight matching
    ("fxfuse weights, groups full + refine", {"cost": "weights", "groups": "full", "untie": True, "refine": True}),
    # ... learning per-unit scales of the fused model with the maps (fxfuse.backend.scales)
    ("fxfuse weights, groups full + refine + scales", {"cost": "weights", "groups": "full", "untie": True,
                                                       "refine": True, "scales": True}),
    # rotary embeddings (Llama): the query/key dims kept pinned, as op-by-op analysis leaves them
    ("fxfuse weights, groups full, rotary pinned", {"cost": "weights", "groups": "full", "untie": True,
                                                    "rules": "rotary pinned"}),
    ("fxfuse weights, groups full, rotary pinned + refine", {"cost": "weights", "groups": "full", "untie": True,
                                                             "rules": "rotary pinned", "refine": True}),
    # data-free: refined on sequences sampled from the parents (fxfuse.models.sampling), no text read
    ("fxfuse weights, groups full + refine on parents' samples", {"cost": "weights", "groups": "full",
                                                                  "untie": True, "refine": "sampled"}),
]
# --refine-steps, --refine-lr, --refine-lr-orthogonal; windows drawn from the train split
# --refine-scales, --refine-lr-scales: learnt unit scales of the fused model; --refine-condition: invertible v/o maps
REFINE = {"steps": 1000, "lr": 0.2, "lr_orthogonal": 0.03, "batch": 32, "windows": 8192, "scales": False,
          "lr_scales": 0.01, "condition": None}
REFINE_SEED = 777                                                    # starts of the refinement windows and their masks
TARGET_REFINE_CUT = 0.95    # with refinement the barrier must fall by at least 95 %
GROUP_PAIRS = [("fxfuse weights", "fxfuse weights, groups full"),
               ("fxfuse activations", "fxfuse activations, groups full")]
TARGET_CUT = 0.5            # the best fxfuse setting must cut the vanilla barrier by at least half
TARGET_FREE_CUT = 0.8       # reading no text (weights, or refined on the parents' samples): at least 80 %
SAMPLED = "on parents' samples"
END_TOL = 1e-4              # relative: aligned and vanilla curves must share their end losses


ACTIVE: list[str] = []  # --rows


def active_settings(kind: str | None = None) -> list[tuple[str, dict]]:
    """The rows to run (``--rows``); the rotary-pinned rows only for models with rotary embeddings."""
    return [(r, o) for r, o in SETTINGS if (not ACTIVE or r in ACTIVE)
            and (kind is None or o.get("rules") != "rotary pinned" or kind in ROTARY_KINDS)]


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def corpus_files() -> tuple[Path, list[Path]]:
    root = Path(sysconfig.get_paths()["stdlib"])
    files = sorted(p for p in root.rglob("*.py")
                   if p.is_file() and not (set(p.relative_to(root).parts[:-1]) & SKIP_DIRS))
    return root, files


def held_out(rel: str) -> bool:
    return int(hashlib.sha1(rel.encode()).hexdigest(), 16) % HELD_OUT_MOD == 0


def load_corpus() -> dict:
    """``{"train": LongTensor, "held_out": LongTensor, "info": {...}}`` byte-level token streams."""
    root, files = corpus_files()
    chunks: dict[str, list[torch.Tensor]] = {"train": [], "held_out": []}
    sizes = {"train": 0, "held_out": 0}
    caps = {"train": TRAIN_CAP, "held_out": HELD_OUT_CAP}
    digest = hashlib.sha1()
    sep = torch.tensor([SEP])
    for p in files:
        rel = p.relative_to(root).as_posix()
        split = "held_out" if held_out(rel) else "train"
        room = caps[split] - sizes[split]
        if room <= 0:
            continue
        data = p.read_bytes()[:min(FILE_CAP, room)]
        if not data:
            continue
        chunks[split] += [torch.frombuffer(bytearray(data), dtype=torch.uint8).long(), sep]
        sizes[split] += len(data)
        digest.update(rel.encode() + b"\0" + data)
    out = {split: torch.cat(parts) for split, parts in chunks.items()}
    counts = {split: len(parts) // 2 for split, parts in chunks.items()}
    out["info"] = {"root": str(root), "files_total": len(files), "files_train": counts["train"],
                   "files_held_out": counts["held_out"], "tokens_train": len(out["train"]),
                   "tokens_held_out": len(out["held_out"]), "sha1": digest.hexdigest()[:12]}
    return out


def windows(stream: torch.Tensor, starts: torch.Tensor) -> torch.Tensor:
    return stream[starts[:, None] + torch.arange(SEQ)]


def evenly(stream: torch.Tensor, n: int) -> torch.Tensor:
    starts = torch.linspace(0, len(stream) - SEQ, n).long()
    return windows(stream, starts)


def mask_tokens(x: torch.Tensor, g: torch.Generator) -> tuple[torch.Tensor, torch.Tensor]:
    """BERT masking: 15 % of positions predicted; of those 80 % [MASK], 10 % a random byte, 10 % kept."""
    chosen = torch.rand(x.shape, generator=g) < MASK_PROB
    labels = torch.where(chosen, x, torch.full_like(x, -100))
    r = torch.rand(x.shape, generator=g)
    rand_bytes = torch.randint(0, 256, x.shape, generator=g)
    inputs = x.clone()
    inputs[chosen & (r < 0.8)] = MASK
    swap = chosen & (r >= 0.8) & (r < 0.9)
    inputs[swap] = rand_bytes[swap]
    return inputs, labels


def build(kind: str, seed: int) -> torch.nn.Module:
    from transformers import BertConfig, BertForMaskedLM, GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    c = CONFIG
    if kind == "bert":
        cfg = BertConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                         num_attention_heads=c["heads"], intermediate_size=c["intermediate"],
                         max_position_embeddings=c["positions"], hidden_dropout_prob=c["dropout"],
                         attention_probs_dropout_prob=c["dropout"], pad_token_id=PAD, tie_word_embeddings=True)
        return BertForMaskedLM(cfg)
    if kind == "llama":  # untied, two query heads per key/value head
        from transformers import LlamaConfig, LlamaForCausalLM

        cfg = LlamaConfig(vocab_size=c["vocab"], hidden_size=c["hidden"], num_hidden_layers=c["layers"],
                          num_attention_heads=c["heads"], num_key_value_heads=max(1, c["heads"] // 2),
                          intermediate_size=c["intermediate"], max_position_embeddings=c["positions"],
                          attention_dropout=c["dropout"], use_cache=False, tie_word_embeddings=False,
                          bos_token_id=SEP, eos_token_id=SEP)
        return LlamaForCausalLM(cfg)
    cfg = GPT2Config(vocab_size=c["vocab"], n_embd=c["hidden"], n_layer=c["layers"], n_head=c["heads"],
                     n_inner=c["intermediate"], n_positions=c["positions"], resid_pdrop=c["dropout"],
                     embd_pdrop=c["dropout"], attn_pdrop=c["dropout"], use_cache=False,
                     bos_token_id=SEP, eos_token_id=SEP)
    return GPT2LMHeadModel(cfg)


def cache_path(kind: str, seed: int, corpus_sha: str) -> Path:
    key = json.dumps({"kind": kind, "seed": seed, "config": CONFIG, "train": TRAIN, "seq": SEQ, "mask": MASK_PROB,
                      "corpus": corpus_sha, "torch": torch.__version__.split("+")[0]}, sort_keys=True)
    return CACHE / f"{kind}_s{seed}_{hashlib.sha1(key.encode()).hexdigest()[:10]}.pt"


def train(kind: str, seed: int, stream: torch.Tensor) -> tuple[torch.nn.Module, dict]:
    hp = TRAIN
    model = build(kind, seed)
    model.train()
    g = torch.Generator().manual_seed(seed)
    opt = torch.optim.AdamW(model.parameters(), lr=hp["lr"], betas=hp["betas"], weight_decay=hp["weight_decay"])
    steps, warm = hp["steps"], max(1, int(hp["warmup"] * hp["steps"]))

    def lr_at(step: int) -> float:
        if step < warm:
            return (step + 1) / warm
        t = (step - warm) / max(1, steps - warm)
        return hp["final_lr_factor"] + (1 - hp["final_lr_factor"]) * 0.5 * (1 + math.cos(math.pi * t))

    sched = torch.optim.lr_scheduler.LambdaLR(opt, lr_at)
    t0 = time.perf_counter()
    recent = []
    for step in range(steps):
        x = windows(stream, torch.randint(0, len(stream) - SEQ, (hp["batch"],), generator=g))
        if kind == "bert":
            x, y = mask_tokens(x, g)
        else:
            y = x
        loss = model(input_ids=x, labels=y).loss
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), hp["clip"])
        opt.step()
        sched.step()
        recent.append(loss.item())
        if (step + 1) % 100 == 0 or step + 1 == steps:
            log(f"  [{kind} seed {seed}] step {step + 1}/{steps}: train loss {statistics.fmean(recent[-50:]):.3f} "
                f"({time.perf_counter() - t0:.0f} s)")
    model.eval()
    return model, {"train_s": time.perf_counter() - t0, "final_train_loss": statistics.fmean(recent[-50:])}


_LOADED: dict[Path, tuple[torch.nn.Module, dict]] = {}  # models of this run (so --retrain trains each once)


def trained(kind: str, seed: int, corpus: dict, retrain: bool) -> tuple[torch.nn.Module, dict]:
    path = cache_path(kind, seed, corpus["info"]["sha1"])
    if path not in _LOADED:
        _LOADED[path] = _trained(path, kind, seed, corpus, retrain)
    return _LOADED[path]


def _trained(path: Path, kind: str, seed: int, corpus: dict, retrain: bool) -> tuple[torch.nn.Module, dict]:
    if path.exists() and not retrain:
        blob = torch.load(path, map_location="cpu", weights_only=False)
        model = build(kind, seed)
        model.load_state_dict(blob["state"], strict=True)
        model.eval()
        return model, {**blob["info"], "cached": True}
    log(f"training {kind} seed {seed} ({TRAIN['steps']} steps)")
    model, info = train(kind, seed, corpus["train"])
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(".tmp")
    torch.save({"state": model.state_dict(), "info": info}, tmp)
    tmp.replace(path)
    return model, {**info, "cached": False}


# ---------------------------------------------------------------- barriers


def eval_data(kind: str, corpus: dict, n_eval: int, n_calib: int) -> dict:
    x_eval = evenly(corpus["held_out"], n_eval)
    calib = evenly(corpus["train"], n_calib)
    if kind == "bert":
        x_eval, y_eval = mask_tokens(x_eval, torch.Generator().manual_seed(EVAL_MASK_SEED))
        calib, _ = mask_tokens(calib, torch.Generator().manual_seed(CALIB_MASK_SEED))
    else:
        y_eval = x_eval.clone()
    g = torch.Generator().manual_seed(REFINE_SEED)
    x_ref = windows(corpus["train"], torch.randint(0, len(corpus["train"]) - SEQ, (REFINE["windows"],), generator=g))
    if kind == "bert":
        x_ref, y_ref = mask_tokens(x_ref, g)
    else:
        y_ref = x_ref.clone()
    return {"inputs": x_eval, "labels": y_eval, "calib": calib, "example": (x_eval[:2].clone(),),
            "refine": (x_ref, y_ref)}


def residual_pin(kind: str, model: torch.nn.Module, example: tuple) -> tuple[str, dict, list[dict]]:
    """The pin pattern for the residual stream, a summary of its space, and the spaces the analysis pins."""
    analysis = fxfuse.analyze(model, example)
    name = WORD_EMBEDDING[kind]
    space = next(s for s in analysis.spaces if any(m.param == name and m.axis == 1 for m in s.members))
    info = {"space": space.id, "size": space.size, "members": len(space.members), "free": space.free,
            "roles": list(space.roles)}
    pinned = [{"id": s.id, "name": s.name, "size": s.size, "reason": s.reason}
              for s in analysis.spaces if not s.free and s.size > 1]
    free = [{"id": s.id, "name": s.name, "size": s.size, "parent": s.parent, "roles": list(s.roles)}
            for s in analysis.spaces if s.free and s.size > 1]
    info["coverage"] = analysis.coverage
    info["free_spaces"] = free
    return f"{name}:1", info, pinned


def curve_dict(c) -> dict:
    return {"lambdas": list(c.lambdas), "loss": list(c.loss), "accuracy": list(c.accuracy or ()),
            "barrier": c.barrier}


def at_half(c) -> tuple[float, float]:
    i = min(range(len(c.lambdas)), key=lambda k: abs(c.lambdas[k] - 0.5))
    return c.loss[i], (c.accuracy[i] if c.accuracy else float("nan"))


def sampled(kind: str, seeds: tuple, a, b, data: dict, corpus: dict, args) -> tuple[torch.Tensor, torch.Tensor]:
    """``--sample`` sequences drawn from the pair (``fxfuse.sample_sequences``, seed 0), labelled by themselves;
    cached next to the models (keyed by both models' cache names and the count)."""
    if HEAD[kind] != "causal":
        raise SystemExit("the parents' samples row needs causal LMs: run it with --models gpt2 or llama")
    names = "_".join(cache_path(kind, s, corpus["info"]["sha1"]).stem for s in seeds)
    path = CACHE / f"samples_{names}_{args.sample}.pt"
    if path.exists():
        x = torch.load(path)
    else:
        t0 = time.perf_counter()
        x = fxfuse.sample_sequences([a, b], data["example"], None, args.sample, seed=0)
        log(f"[{kind}] sampled {args.sample} sequences from seeds {seeds} in {time.perf_counter() - t0:.0f} s")
        CACHE.mkdir(parents=True, exist_ok=True)
        tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
        torch.save(x, tmp)
        os.replace(tmp, path)  # a concurrent run writes the same sequences: the last rename wins
    from fxfuse.models.heads import evaluate

    own = [evaluate(m, x[:512], x[:512], "causal")[0] for m in (a, b)]
    log(f"[{kind}] seeds {seeds}: the parents' loss on {min(512, len(x))} of their samples "
        f"{own[0]:.4f} / {own[1]:.4f} (held-out text: see the table)")
    return x, x.clone()


def rotary_pinned():
    """The shipped rules with the rotary-embedding pattern replaced by ``kind: pin`` (its dims stay in place)."""
    import tempfile

    path = Path(tempfile.mkdtemp()) / "rotary-pinned.yaml"
    path.write_text("- op: pattern.rotary_embedding\n  kind: pin\n")
    return fxfuse.load_rules([path])


def run_pair(kind: str, i: int, corpus: dict, data: dict, pin_pattern: str, args) -> dict:
    seeds = (2 * i + 1, 2 * i + 2)
    models, infos = [], []
    for s in seeds:
        m, info = trained(kind, s, corpus, args.retrain)
        models.append(m)
        infos.append(info)
    a, b = models
    record = {"seeds": seeds, "train": infos, "train_s": sum(x["train_s"] for x in infos), "settings": {},
              "problems": []}
    vanilla = None
    t_pair = time.perf_counter()
    for row, opts in active_settings(kind):
        kw = dict(opts)
        if kw.get("cost") == "activations":
            kw["calib"] = data["calib"]
        if kw.get("pin") == "residual":
            kw["pin"] = [pin_pattern]
        if kw.get("rules") == "rotary pinned":
            kw["rules"] = rotary_pinned()
        scales = kw.pop("scales", False) or REFINE["scales"]
        refine_on = kw.pop("refine", False)
        if refine_on:
            from fxfuse.backend.refine import RefineConfig

            pair_data = data["refine"] if refine_on != "sampled" else sampled(kind, seeds, a, b, data, corpus, args)
            kw["refine"] = RefineConfig(REFINE["steps"], *pair_data, head=HEAD[kind], lr=REFINE["lr"],
                                        batch_size=REFINE["batch"], lr_orthogonal=REFINE["lr_orthogonal"],
                                        scales=scales, lr_scales=REFINE["lr_scales"],
                                        condition=REFINE["condition"])
        t0 = time.perf_counter()
        res = fxfuse.barrier(a, b, data["inputs"], data["labels"], data["example"], points=args.points,
                             head=HEAD[kind], seed=0, **kw)
        secs = time.perf_counter() - t0
        fusion = res.report["fusion"]
        shown = res.refined if res.refined is not None else res.aligned
        entry = {"options": {k: (v if k not in ("calib", "refine") else f"{type(v).__name__}") for k, v in kw.items()},
                 "curve": curve_dict(shown), "seconds": secs, "fusion_timings": fusion["timings"],
                 "self_check": res.report.get("refined_self_check", fusion["self_check"]), "passes": fusion["passes"]}
        if res.refined is not None:
            entry["refine"] = {k: v for k, v in res.report["refine"].items() if k != "units_changed"}
            entry["barrier_before_refine"] = res.aligned.barrier
        # sanity: both curves start at A and end at B (same function), the vanilla curve never changes
        v, al = res.vanilla, shown
        for end, (x, y) in (("λ=0", (v.loss[0], al.loss[0])), ("λ=1", (v.loss[-1], al.loss[-1]))):
            if abs(x - y) > END_TOL * max(1.0, abs(x)):
                msg = f"{row}: end point {end} differs: vanilla {x:.6f} vs aligned {y:.6f}"
                record["problems"].append(msg)
                log(f"[{kind}] pair {i} PROBLEM {msg}")
        if vanilla is None:
            vanilla = v
        elif max(abs(p - q) for p, q in zip(vanilla.loss, v.loss)) > 1e-6:
            msg = f"{row}: the vanilla curve differs from the first call's"
            record["problems"].append(msg)
            log(f"[{kind}] pair {i} PROBLEM {msg}")
        record["settings"][row] = entry
        log(f"[{kind}] pair {i} seeds {seeds} {row}: barrier {al.barrier:.4f} (vanilla {v.barrier:.4f}), "
            f"loss@0.5 {at_half(al)[0]:.4f}; {secs:.1f} s (fusion {fusion['timings']['total_s']:.1f} s"
            + (f", refinement {entry['refine']['steps']} steps {entry['refine']['seconds']:.1f} s, barrier before it "
               f"{entry['barrier_before_refine']:.4f}" if "refine" in entry else "")
            + f"), check {entry['self_check'][1]}")
    record["barrier_s"] = time.perf_counter() - t_pair
    record["vanilla"] = curve_dict(vanilla)
    record["parents"] = [vanilla.loss[0], vanilla.loss[-1]]
    record["parents_accuracy"] = [vanilla.accuracy[0], vanilla.accuracy[-1]] if vanilla.accuracy else None
    return record


def summarise(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "min": min(values), "max": max(values), "n": len(values),
            "values": values}


def run_kind(kind: str, corpus: dict, args) -> dict:
    data = eval_data(kind, corpus, args.eval, args.calib)
    scored = data["labels"] if kind == "bert" else data["labels"][:, 1:]
    scored = scored[scored != -100]
    n_eval_tokens = scored.numel()
    counts = torch.bincount(corpus["train"], minlength=VOCAB).double() + 1.0  # add-one byte frequencies
    unigram = float(-(counts / counts.sum()).log()[scored].mean())
    pairs = []
    pin_pattern = pin_info = pinned = None
    for i in range(args.pairs):
        if pin_pattern is None:
            model0, _ = trained(kind, 1, corpus, args.retrain)
            pin_pattern, pin_info, pinned = residual_pin(kind, model0, data["example"])
            log(f"[{kind}] residual stream: space s{pin_info['space']} (size {pin_info['size']}, "
                f"{pin_info['members']} member axes); pin pattern {pin_pattern!r}")
        rec = run_pair(kind, i, corpus, data, pin_pattern, args)
        pairs.append(rec)
    rows = ["vanilla"] + [row for row, _ in active_settings(kind)]
    summary = {}
    for row in rows:
        curves = [p["vanilla"] if row == "vanilla" else p["settings"][row]["curve"] for p in pairs]
        mid = [at_half(_Curve(c))[0] for c in curves]
        acc = [at_half(_Curve(c))[1] for c in curves]
        summary[row] = {"barrier": summarise([c["barrier"] for c in curves]), "loss_half": summarise(mid),
                        "accuracy_half": summarise(acc)}
    parents = [x for p in pairs for x in p["parents"]]
    out = {"kind": kind, "config": CONFIG, "train": TRAIN, "head": HEAD[kind], "eval_sequences": args.eval,
           "eval_tokens_scored": n_eval_tokens, "unigram_loss": unigram, "calib_sequences": args.calib,
           "points": args.points,
           "residual_pin": {"pattern": pin_pattern, **pin_info}, "pinned_by_analysis": pinned,
           "pairs": pairs, "summary": summary, "parents": summarise(parents)}
    return out


class _Curve:
    """A ``Curve``-like view of a curve dict (for ``at_half`` and the plot)."""

    def __init__(self, d: dict):
        self.lambdas, self.loss = tuple(d["lambdas"]), tuple(d["loss"])
        self.accuracy = tuple(d["accuracy"]) if d.get("accuracy") else None

    @property
    def barrier(self) -> float:
        l0, l1 = self.loss[0], self.loss[-1]
        return max(l - ((1 - t) * l0 + t * l1) for t, l in zip(self.lambdas, self.loss))


def plot_first(res: dict, path: Path) -> None:
    """Loss curves of the first pair: vanilla and every fxfuse setting, the legend under the axes."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    p = res["pairs"][0]
    curves = [("vanilla", _Curve(p["vanilla"]))] + [(row, _Curve(e["curve"])) for row, e in p["settings"].items()]
    fig, ax = plt.subplots(figsize=(7, 5), dpi=120)
    for (label, c), style in zip(curves, ("k--", "C0", "C1", "C3", "C2", "C4", "C5")):
        ax.plot(c.lambdas, c.loss, style, marker="o", markersize=3, label=f"{label} (barrier {c.barrier:.3f})")
    ax.set_xlabel("λ  (0 = model A, 1 = model B aligned into A; vanilla: B as trained)")
    ax.set_ylabel(f"held-out loss ({'masked tokens' if res['kind'] == 'bert' else 'next byte'}, nats)")
    ax.set_title(f"{TITLE[res['kind']]} on held-out stdlib code, seeds {tuple(p['seeds'])}")
    ax.grid(alpha=0.3)
    ax.legend(loc="upper center", bbox_to_anchor=(0.5, -0.14), ncol=2, fontsize=8, frameon=False)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def print_kind(res: dict) -> dict:
    kind, s = res["kind"], res["summary"]
    c, t = res["config"], res["train"]
    seeds = ", ".join(str(tuple(p["seeds"])) for p in res["pairs"])
    print(f"\n### {TITLE[kind]} — {len(res['pairs'])} seed pairs {seeds}\n")
    print(f"hidden {c['hidden']}, {c['layers']} layers, {c['heads']} heads, intermediate {c['intermediate']}, "
          f"vocab {c['vocab']} (bytes + 4 specials), sequences of {SEQ}; AdamW {t['steps']} steps × batch "
          f"{t['batch']}, lr {t['lr']:g}. Held-out: {res['eval_sequences']} sequences ({res['eval_tokens_scored']} "
          f"scored tokens); calibration: {res['calib_sequences']} training sequences; {res['points']} λ points. "
          f"Residual pin: `{res['residual_pin']['pattern']}` (space s{res['residual_pin']['space']}, "
          f"size {res['residual_pin']['size']}).\n")
    rp = res["residual_pin"]
    print(f"Spaces (size > 1): {len(rp['free_spaces'])} free, coverage {100 * rp['coverage']:.1f}% of parameters; pinned "
          "by the analysis: " + "; ".join(f"s{x['id']} {x['name']} (size {x['size']}): {x['reason']}"
                                          for x in res["pinned_by_analysis"]) + "\n")
    print("| setting | barrier (mean) | barrier (min–max) | loss at λ=0.5 (mean) | accuracy at λ=0.5 (mean) |")
    print("|---|---:|---:|---:|---:|")
    for row, r in s.items():
        b, m, a = r["barrier"], r["loss_half"], r["accuracy_half"]
        print(f"| {row} | {b['mean']:.4f} | {b['min']:.4f}–{b['max']:.4f} | {m['mean']:.4f} | {100 * a['mean']:.1f}% |")
    par = res["parents"]
    per = "; ".join(f"{tuple(p['seeds'])}: {p['parents'][0]:.4f} / {p['parents'][1]:.4f}" for p in res["pairs"])
    print(f"\nParents' held-out loss: mean {par['mean']:.4f} (min–max {par['min']:.4f}–{par['max']:.4f}); per pair A / B: {per}. "
          f"For scale: a unigram byte model (train-split frequencies) scores {res['unigram_loss']:.4f}.")
    van = s["vanilla"]["barrier"]["mean"]
    fx = {row: s[row]["barrier"]["mean"] for row, _ in active_settings(res["kind"])}
    best = min((r for r in fx if "refine" not in r), key=fx.get, default=min(fx, key=fx.get))
    cut = (van - fx[best]) / van if van > 0 else float("nan")
    met = cut >= TARGET_CUT
    print(f"\nBest fxfuse setting: {best}, barrier {fx[best]:.4f} vs vanilla {van:.4f}: reduction {100 * cut:.1f}% "
          f"(target ≥ {100 * TARGET_CUT:.0f}%): {'MET' if met else 'NOT MET'}")
    free = {row: v for row, v in fx.items() if "fxfuse weights" in row and ("refine" not in row or SAMPLED in row)}
    result = {"best": best, "reduction": cut, "met": met}
    if free:  # reads no text: weight matching, and refinement on sequences the parents drew
        best_free = min(free, key=free.get)
        cut_free = (van - free[best_free]) / van if van > 0 else float("nan")
        print(f"Data-free (no text read): {best_free}, barrier {free[best_free]:.4f}: reduction "
              f"{100 * cut_free:.1f}% (target ≥ {100 * TARGET_FREE_CUT:.0f}%): "
              f"{'MET' if cut_free >= TARGET_FREE_CUT else 'NOT MET'}")
        result.update(best_free=best_free, reduction_free=cut_free, met_free=cut_free >= TARGET_FREE_CUT)
    print("Reduction vs vanilla per setting: " + ", ".join(
        f"{row} {100 * (van - v) / van:.1f}%" for row, v in fx.items()))
    for perm, full in GROUP_PAIRS:
        if perm in fx and full in fx:
            print(f"groups perm vs full ({perm[7:]}): barrier {fx[perm]:.4f} -> {fx[full]:.4f}; reduction vs vanilla "
                  f"{100 * (van - fx[perm]) / van:.1f}% -> {100 * (van - fx[full]) / van:.1f}%")
    refined = {row: v for row, v in fx.items() if "refine" in row}
    if refined:
        best_ref = min(refined, key=refined.get)
        cut_ref = (van - refined[best_ref]) / van if van > 0 else float("nan")
        costs = [p["settings"][best_ref]["refine"] for p in res["pairs"]]
        train_s = statistics.fmean(p["train_s"] / 2 for p in res["pairs"])
        print(f"With refinement: {best_ref}, barrier {refined[best_ref]:.4f}: reduction {100 * cut_ref:.1f}% "
              f"(target ≥ {100 * TARGET_REFINE_CUT:.0f}%): {'MET' if cut_ref >= TARGET_REFINE_CUT else 'NOT MET'}; "
              f"{costs[0]['steps']} steps of {costs[0]['batch_size']} sequences at lr {costs[0]['lr']:g}, "
              f"{statistics.fmean(c['seconds'] for c in costs):.0f} s per pair, against {train_s:.0f} s to train one "
              f"parent ({res['train']['steps']} steps of {res['train']['batch']})")
        result.update(best_refined=best_ref, reduction_refined=cut_ref, met_refined=cut_ref >= TARGET_REFINE_CUT)
    times = ", ".join(f"{tuple(p['seeds'])}: train {p['train_s']:.0f} s"
                      + (" (cached)" if all(x.get("cached") for x in p["train"]) else "")
                      + f", barriers {p['barrier_s']:.0f} s" for p in res["pairs"])
    print(f"Times per pair: {times}")
    problems = [f"{tuple(p['seeds'])} {m}" for p in res["pairs"] for m in p["problems"]]
    if problems:
        print("PROBLEMS: " + "; ".join(problems))
    return result


def main(argv=None) -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--pairs", type=int, default=3)
    ap.add_argument("--models", default="bert,gpt2", help="comma-separated subset of bert,gpt2,llama")
    ap.add_argument("--points", type=int, default=11, help="λ values on each curve")
    ap.add_argument("--eval", type=int, default=512, help="held-out sequences")
    ap.add_argument("--calib", type=int, default=256, help="training sequences for activation matching")
    ap.add_argument("--json", metavar="FILE", help="also write every number to FILE")
    ap.add_argument("--retrain", action="store_true", help="ignore the cache of trained models")
    ap.add_argument("--threads", type=int, default=2, help="torch intra-op threads")
    ap.add_argument("--steps", type=int, default=TRAIN["steps"], help="training steps per model")
    ap.add_argument("--cache-dir", default=None, help="where trained models are cached (default benchmarks/.cache/text)")
    ap.add_argument("--png-dir", default=str(HERE), help="where text_barrier_<model>.png go")
    ap.add_argument("--refine-steps", type=int, default=REFINE["steps"], help="steps of the + refine rows")
    ap.add_argument("--refine-lr", type=float, default=REFINE["lr"], help="learning rate of the + refine rows")
    ap.add_argument("--refine-lr-orthogonal", type=float, default=REFINE["lr_orthogonal"],
                    help="learning rate of the orthogonal maps in the + refine rows")
    ap.add_argument("--refine-scales", action="store_true",
                    help="every + refine row also learns per-unit scales of the fused model (fxfuse.backend.scales)")
    ap.add_argument("--refine-lr-scales", type=float, default=REFINE["lr_scales"],
                    help="learning rate of the unit scales (--refine-scales)")
    ap.add_argument("--refine-condition", type=float, default=None,
                    help="refine the in-head value/output maps over invertible maps of this condition number at most")
    ap.add_argument("--sample", type=int, default=2048,
                    help="sequences sampled from each pair for the parents' samples row")
    ap.add_argument("--rows", default="", help="semicolon-separated subset of the settings (default: all)")
    args = ap.parse_args(argv)
    REFINE.update(steps=args.refine_steps, lr=args.refine_lr, lr_orthogonal=args.refine_lr_orthogonal,
                  scales=args.refine_scales, lr_scales=args.refine_lr_scales, condition=args.refine_condition)
    kinds = [k.strip() for k in args.models.split(",") if k.strip()]
    if not kinds or any(k not in KINDS for k in kinds):
        ap.error(f"--models: choose from {', '.join(KINDS)}")
    if args.pairs < 1:
        ap.error("--pairs must be ≥ 1")
    TRAIN["steps"] = args.steps
    if args.rows:
        wanted = [r.strip() for r in args.rows.split(";") if r.strip()]
        unknown = [r for r in wanted if r not in dict(SETTINGS)]
        if unknown:
            ap.error(f"--rows: unknown setting {unknown[0]!r} (known: {', '.join(r for r, _ in SETTINGS)})")
        ACTIVE[:] = wanted
    if args.cache_dir:
        globals()["CACHE"] = Path(args.cache_dir)
    torch.set_num_threads(args.threads)
    t_start = time.perf_counter()
    corpus = load_corpus()
    info = corpus["info"]
    log(f"corpus: {info['files_train']} train files ({info['tokens_train']} bytes), {info['files_held_out']} "
        f"held-out files ({info['tokens_held_out']} bytes) of {info['files_total']}; sha1 {info['sha1']}")
    results, targets = {}, {}
    for kind in kinds:
        results[kind] = run_kind(kind, corpus, args)
        png = Path(args.png_dir) / f"text_barrier_{kind}.png"
        plot_first(results[kind], png)
        results[kind]["png"] = str(png)
    print(f"fxfuse loss barriers on real text: Python stdlib sources ({info['root']}), split by file "
          f"(held out: sha1(path) % {HELD_OUT_MOD} == 0): {info['files_train']} train files / "
          f"{info['tokens_train']} bytes, {info['files_held_out']} held-out files / {info['tokens_held_out']} bytes; "
          f"byte-level tokenizer; barrier = max over λ of loss − the straight line between the end losses "
          f"(nats per scored token); B aligned into A, exact solver.")
    for kind in kinds:
        targets[kind] = print_kind(results[kind])
    wall = time.perf_counter() - t_start
    print(f"\nPNGs: {', '.join(r['png'] for r in results.values())}; run time {wall:.0f} s wall "
          f"({args.threads} threads)")
    if args.json:
        payload = {"corpus": info, "seq": SEQ, "tokenizer": "byte-level, 256 bytes + [PAD] [MASK] [CLS] [SEP]",
                   "results": results, "targets": targets, "wall_s": wall, "threads": args.threads,
                   "torch": torch.__version__}
        with open(args.json, "w") as fh:
            json.dump(payload, fh, indent=1, default=str)
            fh.write("\n")


if __name__ == "__main__":
    main()
