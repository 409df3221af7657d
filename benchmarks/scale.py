"""Scale: time and peak memory of ``fxfuse compile`` on large pairs, against the floor measured in the same run.

    OMP_WAIT_POLICY=PASSIVE python benchmarks/scale.py [--pairs bert-base,llama-1b,llama-1b-bf16] [--keep]
                                                       [--device cpu|cuda|auto] [--groups perm|full]
                                                       [--max-passes N]

Each pair is two independently initialised Hugging Face models built from a
config with random weights (seeds 0 and 1), written as sharded safetensors
checkpoints under ``benchmarks/.cache/scale`` (built once, one model in memory
at a time; removed afterwards unless ``--keep``):

* ``bert-base``: BertModel, hidden 768, 12 layers, 12 heads, MLP 3072 (109.5 M);
* ``llama-1b``: LlamaForCausalLM, hidden 2048, 22 layers, 32 query / 4 key-value
  heads, MLP 5632, vocabulary 32000 (1.1 B), float32;
* ``llama-1b-bf16``: the same weights in bfloat16 (converted shard by shard);
* ``llama-1b-4l``: ``llama-1b``'s shapes with 4 layers (0.43 B), a quicker view of its solve;
* ``llama-7b``: Llama-2-7B's shapes (hidden 4096, 32 layers, 32 heads, MLP 11008,
  vocabulary 32000; 6.7 B) in bfloat16, random weights written tensor by tensor
  (``N(0, 0.02²)``, norms ones; 13.5 GB per model); ``llama-7b-2l``: the same
  shapes with 2 layers (0.67 B), a quick view of its per-layer cost.

For each pair the script runs, each in a fresh process:

1. ``fxfuse compile A B -o OUT --force -q``, as a user would: wall time, peak
   RSS of that process (``wait4``);
2. the *floor*: read every tensor of both checkpoints into memory, then form
   every space's similarity products once (``Σ W_a W_bᵀ`` over its member
   axes, float32); any weight-matching fusion does at least this. Where both
   checkpoints do not fit in 40 % of the memory (the 7 B pair), the products
   read each tensor from its file as they use it (the load is then theirs);
3. the interpreter's start-up with ``import torch, transformers, fxfuse``,
   which the compile wall time includes and the floor does not (and, apart,
   ``import fxfuse`` alone: transformers is imported only for a Hugging Face
   model).

``--groups full`` compiles with ``--groups full`` (norm scales folded,
orthogonal maps by Procrustes); the floor is the same (the products of a
Procrustes solve are those of weight matching). ``--max-passes N`` caps the
coordinate descent (the recipe key ``max_passes``, given in a recipe file): orthogonal maps of
random-weight pairs rarely reach a fixed point, so a capped run measures the
cost per pass.

The floor runs with as many threads as the compile (``torch.get_num_threads()``,
which ``OMP_NUM_THREADS`` sets; ``THREADS=N`` overrides). The last lines give
each pair's solve: passes, and the seconds of similarity products and of
assignments summed over blocks (``report.json``'s ``solve_seconds``), the
three slowest blocks named.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent
CACHE = ROOT / ".cache" / "scale"
PAIRS = ("bert-base", "llama-1b", "llama-1b-bf16", "llama-1b-4l", "llama-7b", "llama-7b-2l")
SHARD_BYTES = 2 * 2 ** 30  # the random 7 B-shaped checkpoints: shards of at most this


def _config(name: str):
    import transformers

    if name == "bert-base":
        return transformers.BertModel, transformers.BertConfig()
    if name.startswith("llama-7b"):  # Llama-2-7B's shapes
        return transformers.LlamaForCausalLM, transformers.LlamaConfig(
            hidden_size=4096, intermediate_size=11008, num_hidden_layers=2 if name == "llama-7b-2l" else 32,
            num_attention_heads=32, num_key_value_heads=32, vocab_size=32000, max_position_embeddings=4096,
            tie_word_embeddings=False, dtype="bfloat16")
    config = transformers.LlamaConfig(hidden_size=2048, intermediate_size=5632,
                                      num_hidden_layers=4 if name == "llama-1b-4l" else 22,
                                      num_attention_heads=32, num_key_value_heads=4, vocab_size=32000,
                                      max_position_embeddings=2048, tie_word_embeddings=False)
    return transformers.LlamaForCausalLM, config


def build(name: str) -> tuple[Path, Path]:
    """Write (once) the pair's two checkpoints, sharded; one model in memory at a time."""
    import torch

    dirs = CACHE / f"{name}-a", CACHE / f"{name}-b"
    if all((d / "config.json").is_file() for d in dirs):
        return dirs
    if name.endswith("-bf16"):
        for src, d in zip(build(name.removesuffix("-bf16")), dirs):
            _to_bf16(src, d)
        return dirs
    cls, config = _config(name)
    if name.startswith("llama-7b"):
        for seed, d in zip((0, 1), dirs):
            _random_bf16(cls, config, seed, d)
        return dirs
    for seed, d in zip((0, 1), dirs):
        torch.manual_seed(seed)
        model = cls(config).eval()
        tmp = d.with_name(d.name + ".tmp")
        shutil.rmtree(tmp, ignore_errors=True)
        model.save_pretrained(tmp, max_shard_size="1GB")
        del model
        shutil.rmtree(d, ignore_errors=True)
        os.replace(tmp, d)
    return dirs


def _random_bf16(cls, config, seed: int, dst: Path) -> None:
    """A checkpoint of ``cls(config)``'s shapes in bfloat16, written tensor by tensor (no model in memory):
    norm weights ones, every other tensor ``~ N(0, initializer_range²)`` (the Llama init)."""
    import torch
    from safetensors.torch import save_file

    with torch.device("meta"):
        shapes = {k: tuple(v.shape) for k, v in cls(config).state_dict().items()}
    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    g = torch.Generator().manual_seed(seed)
    shard: dict = {}
    weight_map: dict[str, str] = {}
    total = 0

    def flush() -> None:
        name = f"model-{len(set(weight_map.values())) + 1:05d}.safetensors"
        save_file(shard, str(tmp / name), metadata={"format": "pt"})
        weight_map.update({k: name for k in shard})
        shard.clear()

    for key, shape in shapes.items():
        if key.endswith("norm.weight"):
            t = torch.ones(shape, dtype=torch.bfloat16)
        else:
            t = torch.empty(shape, dtype=torch.bfloat16)
            for rows in torch.split(t.view(shape[0], -1), 1024):  # float32 in pieces
                rows.copy_(torch.randn(rows.shape, generator=g) * config.initializer_range)
        if shard and sum(v.numel() * 2 for v in shard.values()) + t.numel() * 2 > SHARD_BYTES:
            flush()
        shard[key] = t
        total += t.numel() * 2
    flush()
    config.architectures = [cls.__name__]
    config.save_pretrained(tmp)
    index = {"metadata": {"total_size": total}, "weight_map": weight_map}
    (tmp / "model.safetensors.index.json").write_text(json.dumps(index, indent=2) + "\n")
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def _to_bf16(src: Path, dst: Path) -> None:
    """Copy a sharded checkpoint in bfloat16, one shard in memory at a time."""
    import torch
    from safetensors.torch import load_file, save_file

    tmp = dst.with_name(dst.name + ".tmp")
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir(parents=True)
    for f in sorted(src.iterdir()):
        if f.suffix == ".safetensors":
            save_file({k: v.to(torch.bfloat16) for k, v in load_file(str(f)).items()}, str(tmp / f.name),
                      metadata={"format": "pt"})
        elif f.name == "config.json":
            config = json.loads(f.read_text())
            config["dtype"] = "bfloat16"
            (tmp / f.name).write_text(json.dumps(config, indent=2) + "\n")
        elif f.name.endswith(".index.json"):
            index = json.loads(f.read_text())
            index["metadata"]["total_size"] = index["metadata"]["total_size"] // 2
            (tmp / f.name).write_text(json.dumps(index, indent=2) + "\n")
        else:
            shutil.copy(f, tmp / f.name)
    shutil.rmtree(dst, ignore_errors=True)
    os.replace(tmp, dst)


def floor(a: str, b: str) -> dict:
    """Read both checkpoints into memory, then one pass of every block's similarity products."""
    import torch

    torch.set_num_threads(int(os.environ.get("THREADS", torch.get_num_threads())))
    import fxfuse
    from fxfuse.backend.lazy import CheckpointTensors, load_hf_out_of_core
    from fxfuse.planner.plan import blocks
    from fxfuse.planner.weight_cost import WeightCost

    loaded, _ = load_hf_out_of_core(a)
    analysis = fxfuse.analyze(loaded.module, (), example_kwargs=loaded.kwargs)  # shapes only; not counted
    t0, c0 = time.perf_counter(), time.process_time()
    stored = [CheckpointTensors.from_dir(Path(path)) for path in (a, b)]
    size = sum(f.stat().st_size for path in (a, b) for f in Path(path).glob("*.safetensors"))
    held = size < 0.4 * os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")
    # both in memory; where they do not fit, the products read each tensor from its file as they use it
    states = [{k: tensors[k] for k in tensors} for tensors in stored] if held else stored
    t_load, c_load = time.perf_counter() - t0, time.process_time() - c0
    for name, layout in analysis.layouts.items():  # tied names read the stored tensor
        for i, s in enumerate(states):
            if name not in s:
                alias = next(alias for alias in layout.aliases if alias in s)
                if held:
                    s[name] = s[alias]
                else:
                    states[i] = s = s.with_aliases({name: alias})
    cost = WeightCost(analysis, states[0], states[1])
    t1, c1 = time.perf_counter(), time.process_time()
    for blk in blocks(analysis, set()):
        cost.block(blk.root, blk.children, {})
    return {"load_s": t_load, "products_s": time.perf_counter() - t1,
            "cpu_s": c_load + time.process_time() - c1, "held": held}


def _run_measured(argv: list[str], env: dict) -> tuple[float, float, str, float]:
    """Wall seconds, peak RSS (GiB, of this child alone, from wait4), stdout and CPU seconds (user + system).

    On a shared machine the CPU seconds are the steadier figure: the wall
    time grows with whatever else runs.
    """
    import tempfile

    with tempfile.TemporaryFile("w+") as out, tempfile.TemporaryFile("w+") as err:
        t0 = time.perf_counter()
        proc = subprocess.Popen(argv, env=env, stdout=out, stderr=err, text=True)
        _, status, usage = os.wait4(proc.pid, 0)
        wall = time.perf_counter() - t0
        proc.returncode = os.waitstatus_to_exitcode(status)
        out.seek(0)
        err.seek(0)
        if proc.returncode != 0:
            raise SystemExit(f"{' '.join(argv)} failed ({proc.returncode}):\n{err.read()[-3000:]}")
        return wall, usage.ru_maxrss / 2 ** 20, out.read(), usage.ru_utime + usage.ru_stime


def measure(name: str, device: str = "cpu", groups: str = "perm", max_passes: int | None = None) -> dict:
    env = dict(os.environ, HF_HUB_OFFLINE="1", PYTHONWARNINGS="ignore")
    env.setdefault("OMP_WAIT_POLICY", "PASSIVE")
    t0 = time.perf_counter()
    # built in a child process: an exec'd child's peak RSS (wait4) counts the memory of the process it was
    # forked from, so the parent must never hold a model
    subprocess.run([sys.executable, __file__, "--build", name], check=True)
    a, b = CACHE / f"{name}-a", CACHE / f"{name}-b"
    print(f"{name}: checkpoints ready in {time.perf_counter() - t0:.0f} s", file=sys.stderr, flush=True)
    out = CACHE / f"{name}-fused"
    row = {"pair": name if groups == "perm" else f"{name} (groups {groups})"}
    try:
        given = [str(a), str(b)]
        if max_passes:  # a recipe key without a flag
            recipe = CACHE / f"{name}-recipe.yaml"
            recipe.write_text(f"models: [{a}, {b}]\nmax_passes: {max_passes}\n")
            given = [str(recipe)]
        wall, rss, text, cpu = _run_measured([sys.executable, "-m", "fxfuse.commands.cli", "compile", *given, "-o",
                                              str(out), "--force", "-q"]
                                             + (["--device", device] if device != "cpu" else [])
                                             + (["--groups", groups] if groups != "perm" else []), env)
        report = json.loads((out / "report.json").read_text())
        row.update(wall_s=wall, cpu_s=cpu, peak_rss_gib=rss, timings=report["timings"], passes=report["passes"],
                   self_check=report["self_check"], stdout=text.strip(), solve_seconds=report.get("solve_seconds"))
        print(f"{name}: compile {wall:.1f} s ({cpu:.1f} CPU s), {rss:.2f} GiB", file=sys.stderr, flush=True)
        _, frss, ftext, fcpu = _run_measured([sys.executable, __file__, "--floor", str(a), str(b)], env)
        row["floor"] = dict(json.loads(ftext.strip().splitlines()[-1]), peak_rss_gib=frss, process_cpu_s=fcpu)
        row["startup_s"] = _run_measured([sys.executable, "-c", "import torch, transformers, fxfuse.commands.cli, fxfuse.api.fuse"],
                                         env)[0]
        row["startup_fxfuse_s"] = _run_measured([sys.executable, "-c", "import fxfuse.commands.cli, fxfuse.api.fuse"], env)[0]
    finally:
        shutil.rmtree(out, ignore_errors=True)
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--pairs", default=",".join(PAIRS), help=f"comma-separated, of {', '.join(PAIRS)}")
    parser.add_argument("--keep", action="store_true", help="keep the built checkpoints for the next run")
    parser.add_argument("--json", metavar="FILE", help="also write the rows as JSON")
    parser.add_argument("--device", default="cpu", choices=("cpu", "cuda", "auto"), help="fxfuse compile --device")
    parser.add_argument("--groups", default="perm", choices=("perm", "full"), help="fxfuse compile --groups")
    parser.add_argument("--max-passes", type=int, help="the recipe key max_passes of the compile")
    parser.add_argument("--floor", nargs=2, help=argparse.SUPPRESS)
    parser.add_argument("--build", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.build:
        build(args.build)
        return
    if args.floor:
        print(json.dumps(floor(*args.floor)))
        return
    rows = []
    names = args.pairs.split(",")
    try:
        for name in names:
            if name not in PAIRS:
                raise SystemExit(f"unknown pair {name!r} (one of {', '.join(PAIRS)})")
            rows.append(measure(name, args.device, args.groups, args.max_passes))
            if args.json:
                Path(args.json).write_text(json.dumps(rows, indent=1) + "\n")
    finally:
        if not args.keep:  # the pairs and the float32 checkpoints a bf16 pair was made from
            for name in names:
                for base in {name, name.removesuffix("-bf16")}:
                    for side in "ab":
                        shutil.rmtree(CACHE / f"{base}-{side}", ignore_errors=True)
    print("| pair | compile wall | of which start-up | floor (load + products) | wall / floor | "
          "(wall − start-up) / floor | CPU s / floor CPU s | peak RSS | passes | self-check |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for r in rows:
        fl = r["floor"]["load_s"] + r["floor"]["products_s"]
        check = max(c.get("error", 0.0) for c in r["self_check"])
        print(f"| {r['pair']} | {r['wall_s']:.1f} s | {r['startup_s']:.1f} s | {r['floor']['load_s']:.1f} + "
              f"{r['floor']['products_s']:.1f} = {fl:.1f} s | {r['wall_s'] / fl:.1f}× | "
              f"{(r['wall_s'] - r['startup_s']) / fl:.1f}× | {r['cpu_s']:.0f} / {r['floor']['cpu_s']:.0f} = "
              f"{r['cpu_s'] / r['floor']['cpu_s']:.1f}× | {r['peak_rss_gib']:.2f} GiB | "
              f"{list(r['passes'].values())} | {check:.1e} |")
    for r in rows:
        t = r["timings"]
        print(f"{r['pair']}: " + ", ".join(f"{k} {v:.1f} s" for k, v in t.items())
              + f"; start-up of fxfuse alone {r['startup_fxfuse_s']:.1f} s")
        for model, blocks in (r.get("solve_seconds") or {}).items():
            products = sum(b["products_s"] for b in blocks.values())
            assign = sum(b["assign_s"] for b in blocks.values())
            slowest = sorted(blocks.items(), key=lambda kv: -(kv[1]["products_s"] + kv[1]["assign_s"]))[:3]
            print(f"{r['pair']}: model {model}: {r['passes'][model]} passes, {len(blocks)} blocks, products "
                  f"{products:.1f} s, assignments {assign:.1f} s; slowest " + ", ".join(
                      f"{s} ({b['solves']} solves, {b['products_s']:.1f} + {b['assign_s']:.1f} s)" for s, b in slowest))


if __name__ == "__main__":
    main()
