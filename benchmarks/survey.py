"""Held-out survey: tiny Hugging Face architectures outside the zoo, scored like the zoo.

    nice python benchmarks/survey.py [--json] [MODEL_TYPE ...]

For each model type a tiny config is made from the type's defaults (shrunk by
the common size fields, then by ``OVERRIDES``), with a head so that the
residual stream is internal (sequence or image classification, else a causal
LM). A model passes when ``fxfuse.permute`` is sound (the permuted copy
computes the same function) and the permuted copy is fused back into the
original exactly, by weights and by activations (16 random calibration
samples shaped like the example: token ids end in the end-of-sequence token):
relative output error at most 1e-4 each. Coverage is the share of
parameter elements on a free space; ``notes`` counts the report's notes on
spaces without or not determined by activation signal. Each model is built
with seed 0 and permuted with seed 1, so the table is reproducible.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
import time
import traceback
import warnings

import torch

import _paths  # noqa: F401  (tests/ on sys.path, for the zoo)
import fxfuse
from fxfuse.frontend.verify import compare_outputs

TOL = 1e-4
VOCAB, BATCH, SEQ, IMAGE = 97, 2, 8, 32

# field -> tiny value, applied where the type's config has the field
SMALL = {
    "hidden_size": 32, "d_model": 32, "n_embd": 32, "embed_dim": 32, "dim": 32,
    "num_hidden_layers": 2, "n_layer": 2, "num_layers": 2, "n_layers": 2, "encoder_layers": 2, "decoder_layers": 2,
    "num_attention_heads": 4, "n_head": 4, "n_heads": 4, "encoder_attention_heads": 4, "decoder_attention_heads": 4,
    "intermediate_size": 64, "n_inner": 64, "ffn_dim": 64, "encoder_ffn_dim": 64, "decoder_ffn_dim": 64,
    "hidden_dim": 64, "d_ff": 64,
    "vocab_size": VOCAB, "max_position_embeddings": 64, "n_positions": 64, "max_seq_len": 64,
    "image_size": IMAGE, "patch_size": 4, "num_channels": 3,
    "use_cache": False, "pad_token_id": 0, "bos_token_id": 1, "eos_token_id": 2, "decoder_start_token_id": 1,
    "hidden_dropout_prob": 0.0, "attention_probs_dropout_prob": 0.0, "dropout": 0.0, "attention_dropout": 0.0,
    "num_labels": 3,
}

# per type: fields the common ones do not reach (hierarchical stages, odd names)
OVERRIDES = {
    "albert": {"embedding_size": 16, "num_hidden_groups": 1},
    "bloom": {"n_head": 4},
    "codegen": {"rotary_dim": 4, "n_ctx": 64},
    "ctrl": {"dff": 64},
    "deberta": {"max_relative_positions": 16, "position_buckets": 8, "pooler_hidden_size": 32},
    "deberta-v2": {"max_relative_positions": 16, "position_buckets": 8, "pooler_hidden_size": 32},
    "funnel": {"block_sizes": [1, 1], "d_head": 8, "d_inner": 64, "n_head": 4, "num_hidden_layers": None},
    "gemma": {"head_dim": 8, "num_key_value_heads": 2},
    "gemma2": {"head_dim": 8, "num_key_value_heads": 2, "sliding_window": 4},
    "gptj": {"rotary_dim": 4},
    "gpt_neo": {"attention_types": [[["global", "local"], 1]], "window_size": 4},
    "gpt_neox": {"rotary_pct": 0.5},
    "mistral": {"num_key_value_heads": 2, "head_dim": 8},
    "mobilebert": {"embedding_size": 16, "intra_bottleneck_size": 16, "true_hidden_size": 16,
                   "num_feedforward_networks": 2},
    "olmo2": {"num_key_value_heads": 2},
    "persimmon": {"partial_rotary_factor": 0.5},
    "phi": {"partial_rotary_factor": 0.5},
    "qwen3": {"num_key_value_heads": 2, "head_dim": 8},
    "rembert": {"input_embedding_size": 16, "output_embedding_size": 16},
    "stablelm": {"num_key_value_heads": 2, "partial_rotary_factor": 0.25},
    "starcoder2": {"num_key_value_heads": 2},
    "cohere": {"num_key_value_heads": 2},
    "granite": {"num_key_value_heads": 2},
    "xglm": {"attention_heads": 4},
    "regnet": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "embedding_size": 16, "groups_width": 8},
    "poolformer": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_encoder_blocks": 4},
    "segformer": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_attention_heads": [1, 2, 4, 8],
                  "decoder_hidden_size": 32, "num_encoder_blocks": 4},
    "bit": {"hidden_sizes": [16, 32, 64, 128], "depths": [1, 1, 1, 1], "embedding_size": 16, "num_groups": 4},
    "focalnet": {"embed_dim": 8, "depths": [1, 1, 1, 1]},
    "swinv2": {"embed_dim": 8, "depths": [1, 1, 1, 1], "num_heads": [1, 2, 2, 4], "window_size": 2,
               "num_attention_heads": None, "num_layers": None, "hidden_size": None},
    "pvt": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_encoder_blocks": 4,
            "num_attention_heads": [1, 2, 4, 8], "mlp_ratios": [2, 2, 2, 2]},
    "pvt_v2": {"hidden_sizes": [8, 16, 32, 64], "depths": [1, 1, 1, 1], "num_encoder_blocks": 4,
               "num_attention_heads": [1, 2, 4, 8], "mlp_ratios": [2, 2, 2, 2]},
    "mobilenet_v1": {"depth_multiplier": 0.25},
    "mobilevit": {"hidden_sizes": [16, 24, 32], "neck_hidden_sizes": [8, 8, 16, 16, 24, 24, 32]},
    "dinov2": {"mlp_ratio": 2},
}

TEXT = ["albert", "bart", "biogpt", "bloom", "camembert", "codegen", "cohere", "convbert", "ctrl", "data2vec-text",
        "deberta", "deberta-v2", "electra", "ernie", "esm", "gemma", "gemma2", "gpt_neo", "gpt_neox", "gptj",
        "granite", "megatron-bert", "mistral", "mobilebert", "mpnet", "nystromformer", "olmo", "olmo2", "opt",
        "persimmon", "phi", "qwen3", "rembert", "roformer", "stablelm", "starcoder2", "xglm", "xlm-roberta", "yoso",
        "mbart", "funnel"]
VISION = ["deit", "dinov2", "dinov2_with_registers", "regnet", "poolformer", "segformer", "bit", "focalnet", "swinv2", "pvt",
          "pvt_v2", "ijepa", "mobilenet_v1", "mobilevit", "data2vec-vision", "vit_msn"]


def build(model_type: str, seed: int = 0):
    """``(model, args)``: a tiny model of ``model_type`` with a head, random weights from ``seed``, eval mode."""
    import transformers
    from zoo import _informative

    default = transformers.AutoConfig.for_model(model_type)
    fields = {k: v for k, v in SMALL.items() if hasattr(default, k)}
    if hasattr(default, "num_key_value_heads"):
        fields["num_key_value_heads"] = SMALL["num_attention_heads"]
    if getattr(default, "head_dim", None) is not None:
        fields["head_dim"] = SMALL["hidden_size"] // SMALL["num_attention_heads"]
    fields.update(OVERRIDES.get(model_type, {}))
    fields = {k: v for k, v in fields.items() if v is not None}  # None: leave the type's default
    cfg = transformers.AutoConfig.for_model(model_type, **fields)  # derived fields follow the sizes
    if getattr(cfg, "layer_types", None) is not None and hasattr(cfg, "num_hidden_layers"):
        cfg.layer_types = list(cfg.layer_types)[: cfg.num_hidden_layers]  # per-layer attention kinds: the depth
    cfg.architectures = cfg.architectures or []  # a type with several classes per task takes the first
    vision = model_type in VISION
    autos = (["AutoModelForImageClassification"] if vision
             else ["AutoModelForSequenceClassification", "AutoModelForCausalLM"])
    errors = []
    for auto in autos:
        try:
            torch.manual_seed(seed)
            model = getattr(transformers, auto).from_config(cfg)
            break
        except (ValueError, KeyError) as exc:
            errors.append(str(exc).splitlines()[0])
    else:
        raise RuntimeError("; ".join(errors))
    _informative(model)
    g = torch.Generator().manual_seed(1234)
    ids = torch.randint(3, VOCAB, (BATCH, SEQ), generator=g)
    ids[:, -1] = SMALL["eos_token_id"]  # encoder-decoder classifiers pool the end-of-sequence token
    args = (torch.randn(BATCH, 3, IMAGE, IMAGE, generator=g),) if vision else (ids,)
    return model.eval(), args


def calibration(args: tuple, n: int = 16) -> torch.Tensor:
    """``n`` random samples shaped like the example: images ``~ N(0, 1)``; token ids like ``build``'s (random
    ids ending in the end-of-sequence token, which encoder-decoder classifiers pool)."""
    g = torch.Generator().manual_seed(4321)
    x = args[0]
    if x.is_floating_point():
        return torch.randn((n,) + tuple(x.shape[1:]), generator=g)
    ids = torch.randint(3, VOCAB, (n,) + tuple(x.shape[1:]), generator=g)
    ids[:, -1] = SMALL["eos_token_id"]
    return ids


def score(model_type: str) -> dict:
    out = {"model": model_type, "class": "", "params": 0, "coverage": None, "permute": None, "weights": None,
           "activations": None, "notes": 0, "unruled": [], "error": "", "seconds": 0.0}
    t0 = time.perf_counter()
    try:
        model, args = build(model_type)
        out["class"], out["params"] = type(model).__name__, sum(p.numel() for p in model.parameters())
        analysis = fxfuse.analyze(model, args)
        out["coverage"] = analysis.coverage
        out["unruled"] = sorted({u.op for u in analysis.unruled})
        permuted = fxfuse.permute(model, args, seed=1)
        out["permute"] = compare_outputs(model, permuted, args)
        for cost in ("weights", "activations"):
            r = fxfuse.compile([permuted, model], args, target=1, cost=cost, calib=calibration(args))
            out[cost] = compare_outputs(model, r.module, args)
            if cost == "activations":
                out["notes"] = sum("activation signal" in n or "determined by its signal" in n
                                   for n in r.report["notes"])
    except Exception as exc:  # a row per model whatever fails: the table is the finding
        last = traceback.extract_tb(exc.__traceback__)[-1]
        out["error"] = f"{type(exc).__name__}: {str(exc).splitlines()[0][:160]} ({os.path.basename(last.filename)}:{last.lineno})"
    out["seconds"] = time.perf_counter() - t0
    return out


def passed(r: dict) -> bool:
    return not r["error"] and all(r[k] is not None and r[k] <= TOL for k in ("permute", "weights", "activations"))


def main() -> None:
    warnings.filterwarnings("ignore")
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("models", nargs="*", help="model types (default: all surveyed)")
    parser.add_argument("--json", action="store_true")
    args = parser.parse_args()
    names = args.models or TEXT + VISION
    fmt = lambda v: "—" if v is None else f"{v:.1e}"  # noqa: E731
    rows = []
    if not args.json:
        print("| model type | class | params | coverage | permute | weights | activations | notes | pass | "
              "unruled / error |")
        print("|---|---|---:|---:|---:|---:|---:|---:|---|---|")
    for name in names:
        r = score(name)
        rows.append(r)
        if not args.json:
            cov = "—" if r["coverage"] is None else f"{r['coverage']:.0%}"
            print(f"| {name} | {r['class']} | {r['params']:,} | {cov} | {fmt(r['permute'])} | {fmt(r['weights'])} | "
                  f"{fmt(r['activations'])} | {r['notes']} | {'yes' if passed(r) else 'no'} | "
                  f"{r['error'] or ', '.join(r['unruled'])} |", flush=True)
    if args.json:
        print(json.dumps(rows, indent=1))
    else:
        print(f"\n{sum(passed(r) for r in rows)}/{len(rows)} pass")


if __name__ == "__main__":
    main()
