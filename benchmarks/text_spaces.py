"""Where the text barrier sits: GPT-2 and BERT MLM barriers with one space (family) aligned at a time.

    python benchmarks/text_spaces.py [--models gpt2,bert] [--pair 0] [--steps 1200] [--points 11]
                                     [--eval 512] [--refine-steps 600] [--parts abc] [--threads 1] [--json FILE]

The models, corpus and held-out data are those of ``benchmarks/text.py`` (pair
``i`` is seeds ``(2i+1, 2i+2)``, trained ``--steps`` steps and cached under
``benchmarks/.cache/text``). B is aligned into A with ``groups="full"``
(``untie=True``), weight matching, seed 0, run pass by pass
(``fxfuse.passes``): the data-free maps, then the maps refined from them
(``RefineConfig``: GPT-2 600 steps, lr 0.05, orthogonal 0.01; BERT 600 steps,
lr 0.05, orthogonal 0.03, the best rows of docs/benchmarks.md). Each space's
map is a symmetry on its own, so any subset of the maps (the others at the
identity) is again an exact alignment: every partial alignment below goes
through the self-check of ``fxfuse.passes.check`` and its curve's end points
must equal the parents' held-out losses.

Spaces are grouped in families: the residual stream; per layer the heads
(as wholes), the in-head q/k maps, the in-head v/o maps, the MLP units (and
other unit spaces, e.g. BERT's MLM head transform); and the same families
over all layers. An in-head map is defined after its head permutation, so it
is always applied with it: "only q/k aligned" keeps the heads' permutation,
and "heads left out" drops the in-head maps of those heads too.

The first table also holds the stream map (data-free or refined) with every
other space weight-matched again around it (data-free, the stream fixed):
whether a better stream map alone would carry a data-free fusion further.

(a) data-free: the barrier when only a family is aligned (the rest at the
    identity), and when only it is left out (the rest aligned);
(b) refined: the data-free maps with the refined maps of one family put in
    (alone, and together with the refined stream map), the refined maps with one family put back to its data-free maps (a
    family whose head permutation refinement changed moves with its heads),
    and the refined maps with one family left out (at the identity);
(c) per block: A's weights everywhere except one block's parameters,
    interpolated towards B aligned (data-free and refined): the loss excess
    over A's at λ = ½ and at λ = 1 (A with the block of B aligned).

``--parts`` picks the tables (a, b, c); (b) and the refined column of (c)
need refinement (``--refine-steps 0`` skips it).

Barriers are held-out losses (nats per scored token) minus the chord between
the end losses, the max over ``--points`` λ values; "cut" is the reduction
against the vanilla barrier (B as trained).
"""
from __future__ import annotations

import argparse
import json
import re
import sys
import time
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable, Mapping

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))

from fxfuse import passes  # noqa: E402
from fxfuse.api.barrier import Curve, curve  # noqa: E402
from fxfuse.backend.lazy import aligned_tensors  # noqa: E402
from fxfuse.backend.refine import RefineConfig  # noqa: E402
from fxfuse.planner.plan import Alignment, align  # noqa: E402
from fxfuse.planner.weight_cost import WeightCost  # noqa: E402

END_TOL = 1e-4  # relative: a partial alignment's curve must start at A's loss and end at B's
BLOCK_POINTS = 3  # λ = 0, ½, 1
REFINE = {"gpt2": {"steps": 600, "lr": 0.05, "lr_orthogonal": 0.01},
          "bert": {"steps": 600, "lr": 0.05, "lr_orthogonal": 0.03}}
BLOCKS = {  # (pattern on a parameter name, block label); the first that matches names the block
    "gpt2": [(r"transformer\.h\.(\d+)\.(ln_1|attn)\.", "block {} attention"),
             (r"transformer\.h\.(\d+)\.(ln_2|mlp)\.", "block {} MLP"),
             (r"transformer\.(wte|wpe)\.", "embeddings"), (r"(transformer\.ln_f|lm_head)\.", "final norm + LM head")],
    "bert": [(r"bert\.encoder\.layer\.(\d+)\.attention\.", "block {} attention"),
             (r"bert\.encoder\.layer\.(\d+)\.(intermediate|output)\.", "block {} MLP"),
             (r"bert\.embeddings\.", "embeddings"), (r"cls\.", "MLM head")],
}


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


# ---------------------------------------------------------------- families of spaces


@dataclass(frozen=True)
class Family:
    name: str
    spaces: frozenset[int]


def _layer(space) -> str:
    m = re.search(r"\.(?:h|layer)\.(\d+)\.", space.members[0].param)
    return m.group(1) if m else ""


def families(analysis, stream: int) -> list[Family]:
    """The free spaces of ``analysis`` in families: stream, per layer heads / q/k / v/o / units, then per kind over
    all layers (kinds with one space only appear once)."""
    kinds: dict[str, list[tuple[str, int]]] = {}
    for s in analysis.spaces:
        if not s.free or s.size < 2:
            continue
        if s.id == stream:
            kind = "stream"
        elif "heads" in s.roles:
            kind = "heads"
        elif "qk_dim" in s.roles:
            kind = "q/k"
        elif "v_dim" in s.roles:
            kind = "v/o"
        elif re.search(r"\.(mlp|intermediate)\.", s.members[0].param):
            kind = "MLP"
        else:
            kind = s.members[0].param.rsplit(".", 2)[0]  # the module of its first member
        kinds.setdefault(kind, []).append((_layer(s), s.id))
    out = [Family("residual stream" if k == "stream" else k, frozenset(i for _, i in v))
           for k, v in kinds.items() if k == "stream" or len(v) == 1]
    layered = {k: v for k, v in kinds.items() if k != "stream" and len(v) > 1}
    for layer in sorted({lay for v in layered.values() for lay, _ in v}, key=lambda x: (len(x), x)):
        out += [Family(f"{k} L{layer}", frozenset(i for lay, i in v if lay == layer))
                for k, v in layered.items() if any(lay == layer for lay, _ in v)]
    out += [Family(f"{k} (all layers)", frozenset(i for _, i in v)) for k, v in layered.items()]
    attention = [i for k in ("heads", "q/k", "v/o") for _, i in kinds.get(k, [])]
    if attention:
        out.append(Family("attention: heads, q/k, v/o (all layers)", frozenset(attention)))
    return out


def with_parents(spaces, parents: Mapping[int, int]) -> set[int]:
    out = set(spaces)
    for s in spaces:
        while s in parents:
            s = parents[s]
            out.add(s)
    return out


def with_children(spaces, parents: Mapping[int, int]) -> set[int]:
    out = set(spaces)
    out |= {c for c, p in parents.items() if p in out}
    return out


def keep(al: Alignment, spaces) -> Alignment:
    """``al`` with only the maps of ``spaces`` (every other space at the identity)."""
    return replace(al, maps={s: m for s, m in al.maps.items() if s in spaces})


def same_map(x, y) -> bool:
    return all((a is None and b is None) or (a is not None and b is not None and torch.equal(a, b))
               for a, b in ((x.perm, y.perm), (x.q, y.q), (x.matrix, y.matrix)))


def mixed(base: Alignment, other: Alignment, spaces, parents: Mapping[int, int]) -> tuple[Alignment, set[int]]:
    """``base`` with ``other``'s maps for ``spaces``; a nested space's map only means something after its parent's,
    so where ``other`` permutes a parent differently, the parent and all its nested spaces move together."""
    spaces = set(spaces)
    for s in list(with_parents(spaces, parents)):
        if s in other.maps and s in base.maps and not same_map(other.maps[s], base.maps[s]) and (
                s in set(parents.values())):
            spaces |= with_children({s}, parents)
    return replace(base, maps={**base.maps, **{s: other.maps[s] for s in spaces if s in other.maps}}), spaces


# ---------------------------------------------------------------- scoring


@dataclass
class Scorer:
    """Runs partial alignments through emit and the self-check, and scores them on held-out data."""

    inputs: object
    same_depth: object
    analysed: object
    data: torch.Tensor
    labels: torch.Tensor
    head: str
    points: int
    ends: tuple[float, float]
    progress: Callable[[str], None] = lambda _m: None

    def aligned(self, al: Alignment) -> tuple[torch.nn.Module, Mapping[str, torch.Tensor], float]:
        planned = passes.Planned((None, al))
        emitted = passes.emit(self.analysed, planned)
        checked = passes.check(self.inputs, self.same_depth, self.analysed, planned, emitted)  # FusionError if unsound
        return checked.modules[0], checked.aligned[1], float(checked.entries[1]["error"])

    def score(self, al: Alignment, label: str) -> dict:
        a, state_b, err = self.aligned(al)
        c = curve(a, state_b, self.data, self.labels, self.head, self.points)
        problems = self.end_problems(c, label)
        self.progress(f"{label}: barrier {c.barrier:.4f} (self-check {err:.1e})")
        return {"barrier": c.barrier, "loss": list(c.loss), "self_check": err, "problems": problems}

    def end_problems(self, c: Curve, label: str) -> list[str]:
        out = []
        for end, x, y in (("λ=0", self.ends[0], c.loss[0]), ("λ=1", self.ends[1], c.loss[-1])):
            if abs(x - y) > END_TOL * max(1.0, abs(x)):
                out.append(f"{label}: end point {end} {y:.6f} differs from the parent's {x:.6f}")
        return out

    def block(self, al: Alignment, keys: set[str], label: str) -> dict:
        """A everywhere, ``keys`` interpolated towards B aligned by ``al``: the loss excess over A's at λ = ½ and at
        λ = 1 (A with the block of B aligned)."""
        a, state_b, _ = self.aligned(al)
        state_a = a.state_dict()
        hybrid = {k: (state_b[k] if k in keys else v) for k, v in state_a.items()}
        c = curve(a, hybrid, self.data, self.labels, self.head, BLOCK_POINTS)
        problems = [] if abs(c.loss[0] - self.ends[0]) <= END_TOL * max(1.0, abs(self.ends[0])) else [
            f"{label}: λ=0 {c.loss[0]:.6f} differs from A's {self.ends[0]:.6f}"]
        mid = c.loss[len(c.loss) // 2] - c.loss[0]
        self.progress(f"{label}: at λ=½ {mid:+.4f}, far end {c.loss[-1] - c.loss[0]:+.4f}")
        return {"mid_excess": mid, "end_excess": c.loss[-1] - c.loss[0], "loss": list(c.loss), "problems": problems}


def block_groups(module: torch.nn.Module, patterns) -> dict[str, set[str]]:
    """Parameter names by block (``patterns``: ``(regex, label)``); tied names share their block."""
    groups: dict[str, set[str]] = {}
    owner: dict[int, str] = {}
    for name, t in module.state_dict(keep_vars=True).items():
        label = next((lab.format(*(m.groups()[:1])) for pat, lab in patterns if (m := re.match(pat, name))), "other")
        ptr = t.data_ptr()
        label = owner.setdefault(ptr, label)  # a tied tensor stays with the block of its first name
        groups.setdefault(label, set()).add(name)
    return groups


# ---------------------------------------------------------------- the breakdown


def setup(a, b, example: tuple, data, labels, head: str, points: int, refine: RefineConfig | None,
          progress=lambda _m: None):
    """Run the passes (groups full, untie, weights, seed 0): the scorer, the data-free and refined alignments, and
    the vanilla curve (B as it is)."""
    options = passes.Options.of(2, cost="weights", groups="full", untie=True, seed=0, refine=refine)
    inputs = passes.prepare([a, b], example, None, options)
    same = passes.relayer(inputs, options)
    analysed = passes.analyse(inputs, same, options)
    t0 = time.perf_counter()
    planned = passes.plan(inputs, same, analysed, options)
    plan_s = time.perf_counter() - t0
    refined = None
    if refine is not None:
        refined, report = passes.refine(inputs, same, analysed, planned, options)
        refined = refined.alignments[1]
        progress(f"refined {refine.steps} steps in {report['seconds']:.1f} s")
    vanilla = curve(a, b.state_dict(), data, labels, head, points)
    scorer = Scorer(inputs, same, analysed, data, labels, head, points, (vanilla.loss[0], vanilla.loss[-1]), progress)
    return scorer, planned.alignments[1], refined, vanilla, plan_s


def rematched(scorer: Scorer, held: Alignment, seed: int = 0) -> Alignment:
    """``held``'s maps, and every other space weight-matched again (groups full, exact) with them in place.

    The source is first moved by ``held``; weight matching of the moved source, ``held``'s spaces fixed, gives
    the other maps (maps of different spaces commute, so the union is the whole alignment)."""
    an = scorer.analysed
    source, state = an.analyses[1], an.states[1]
    moved = aligned_tensors(source, state, held)
    skip = scorer.same_depth.skipped(1, state) | (an.ref.scales if an.levels else frozenset())
    cost = WeightCost(an.ref, an.states[0], moved, source=source, skip=skip)
    found = align(an.ref, cost, solver="exact", fixed=set(an.fixed) | set(held.maps), seed=seed, iterative=True,
                  cost_name="weights", levels=an.levels)
    return replace(held, maps={**{s: m for s, m in found.maps.items() if s not in held.maps}, **held.maps})


def stream_space(analysis, word_embedding: str) -> int:
    return next(s.id for s in analysis.spaces if any(m.param == word_embedding and m.axis == 1 for m in s.members))


def breakdown(a, b, example: tuple, data, labels, head: str, word_embedding: str, points: int = 11,
              refine: RefineConfig | None = None, blocks=None, parts: str = "abc", progress=lambda _m: None) -> dict:
    """The tables ``parts`` of the module's docstring for the pair ``(a, b)`` (``blocks``: the block patterns of
    (c)), as a dict of rows (see ``format_tables``)."""
    scorer, free, ref, vanilla, plan_s = setup(a, b, example, data, labels, head, points, refine, progress)
    analysis = scorer.analysed.ref
    parents = dict(analysis.parents)
    stream = stream_space(analysis, word_embedding)
    fams = families(analysis, stream)
    everything = set(free.maps)
    out = {"vanilla": vanilla.barrier, "parents": [vanilla.loss[0], vanilla.loss[-1]], "plan_s": plan_s,
           "families": {f.name: sorted(f.spaces) for f in fams}, "problems": [],
           "base": {"none aligned (norm scales folded only)": scorer.score(keep(free, ()), "none aligned"),
                    "data-free, all aligned": scorer.score(free, "data-free")}}
    if ref is not None:
        out["base"]["refined, all"] = scorer.score(ref, "refined")
        out["changed"] = sorted(s for s in everything if not same_map(free.maps[s], ref.maps[s]))
        for name, held in (("data-free", free), ("refined", ref)):
            out["base"][f"{name} stream map, every other space weight-matched again"] = scorer.score(
                rematched(scorer, keep(held, {stream})), f"{name} stream, the rest weight-matched")
    for f in fams if "a" in parts else ():
        only, left = with_parents(f.spaces, parents), everything - with_children(f.spaces, parents)
        out.setdefault("data_free", {})[f.name] = {"only": scorer.score(keep(free, only), f"only {f.name}"),
                                    "left_out": scorer.score(keep(free, left), f"all but {f.name}"),
                                    "only_spaces": sorted(only), "left_out_spaces": sorted(everything - left)}
    for f in fams if ref is not None and "b" in parts else ():
        put_in, moved_in = mixed(free, ref, f.spaces, parents)
        taken_out, moved_out = mixed(ref, free, f.spaces, parents)
        left = everything - with_children(f.spaces, parents)
        out.setdefault("refined", {})[f.name] = {
            "put_in": scorer.score(put_in, f"data-free + refined {f.name}"),
            "with_stream": scorer.score(mixed(free, ref, f.spaces | {stream}, parents)[0],
                                        f"data-free + refined stream and {f.name}"),
            "taken_out": scorer.score(taken_out, f"refined but {f.name} data-free"),
            "left_out": scorer.score(keep(ref, left), f"refined but {f.name} at the identity"),
            "spaces": sorted(moved_in | moved_out)}
    if blocks and "c" in parts:
        groups = block_groups(scorer.aligned(free)[0], blocks)
        out["blocks"] = {}
        for label, keys in groups.items():
            row = {"params": len(keys), "data_free": scorer.block(free, keys, f"block {label}, data-free")}
            if ref is not None:
                row["refined"] = scorer.block(ref, keys, f"block {label}, refined")
            out["blocks"][label] = row
    out["problems"] = [p for row in _rows(out) for p in row.get("problems", [])]
    return out


def _rows(out: dict):
    yield from out["base"].values()
    for r in out.get("data_free", {}).values():
        yield from (r["only"], r["left_out"])
    for r in out.get("refined", {}).values():
        yield from (r["put_in"], r["with_stream"], r["taken_out"], r["left_out"])
    for r in out.get("blocks", {}).values():
        yield from (v for k, v in r.items() if isinstance(v, dict))


def format_tables(out: dict, title: str = "") -> str:
    """Markdown tables of a ``breakdown`` result."""
    van = out["vanilla"]

    def cell(x: float) -> str:
        return f"{x:.4f} | " + (f"{100 * (x - van) / van:+.1f}%" if van > 0 else "")

    lines = [f"### {title}", "", f"Parents' held-out loss {out['parents'][0]:.4f} / {out['parents'][1]:.4f}; "
             f"vanilla barrier {van:.4f}.", "", "| alignment | barrier | vs vanilla |", "|---|---:|---:|"]
    lines += [f"| {k} | {cell(v['barrier'])} |" for k, v in out["base"].items()]
    if "data_free" in out:
        lines += ["", "(a) data-free maps (groups full, weights): one family aligned alone / left out alone", "",
                  "| family (spaces) | only it aligned | vs vanilla | all but it | vs vanilla |",
                  "|---|---:|---:|---:|---:|"]
    for name, r in out.get("data_free", {}).items():
        sp = ",".join(f"s{s}" for s in out["families"][name])
        lines.append(f"| {name} ({sp}) | {cell(r['only']['barrier'])} | {cell(r['left_out']['barrier'])} |")
    if "refined" in out:
        ch = ",".join(f"s{s}" for s in out["changed"])
        lines += ["", f"(b) refined maps (spaces refinement changed: {ch or 'none'}): one family's refined map put "
                  "into the data-free maps (alone / with the refined stream map) / put back to data-free in the "
                  "refined maps / left out (identity) of the refined maps", "",
                  "| family (spaces moved) | data-free + it refined | vs vanilla | + the stream refined | vs vanilla "
                  "| refined, it data-free | vs vanilla | refined, it at identity | vs vanilla |",
                  "|---|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for name, r in out["refined"].items():
            sp = ",".join(f"s{s}" for s in r["spaces"])
            lines.append(f"| {name} ({sp}) | {cell(r['put_in']['barrier'])} | {cell(r['with_stream']['barrier'])} | "
                         f"{cell(r['taken_out']['barrier'])} | {cell(r['left_out']['barrier'])} |")
    if "blocks" in out:
        mid = {k: v["loss"][len(v["loss"]) // 2] - v["loss"][0] for k, v in out["base"].items()
               if k in ("data-free, all aligned", "refined, all")}
        lines += ["", "(c) A everywhere, one block interpolated towards B aligned: loss minus A's at λ = ½ and at "
                  "λ = 1 (A with the block of B aligned); the whole model interpolated: "
                  + ", ".join(f"{k} {v:+.4f} at λ = ½" for k, v in mid.items()), "",
                  "| block (parameters) | data-free, λ = ½ | data-free, λ = 1 | refined, λ = ½ | refined, λ = 1 |",
                  "|---|---:|---:|---:|---:|"]
        for label, r in out["blocks"].items():
            d, f = r["data_free"], r.get("refined")
            lines.append(f"| {label} ({r['params']}) | {d['mid_excess']:+.4f} | {d['end_excess']:+.4f} | "
                         + (f"{f['mid_excess']:+.4f} | {f['end_excess']:+.4f} |" if f else " | |"))
    if out["problems"]:
        lines += ["", "PROBLEMS: " + "; ".join(out["problems"])]
    return "\n".join(lines)


def main(argv=None) -> None:
    import text

    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--models", default="gpt2,bert")
    ap.add_argument("--pair", type=int, default=0, help="seed pair i = seeds (2i+1, 2i+2)")
    ap.add_argument("--steps", type=int, default=1200, help="training steps of the parents (text.py --steps)")
    ap.add_argument("--points", type=int, default=11)
    ap.add_argument("--eval", type=int, default=512, help="held-out sequences")
    ap.add_argument("--refine-steps", type=int, default=None, help="refinement steps (default 600; 0: no (b))")
    ap.add_argument("--parts", default="abc", help="which tables: a (data-free), b (refined), c (blocks)")
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--json", metavar="FILE")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    text.TRAIN["steps"] = args.steps
    t_start = time.perf_counter()
    corpus = text.load_corpus()
    results = {}
    for kind in [k.strip() for k in args.models.split(",") if k.strip()]:
        if kind not in text.KINDS:
            ap.error(f"--models: choose from {', '.join(text.KINDS)}")
        seeds = (2 * args.pair + 1, 2 * args.pair + 2)
        a, b = (text.trained(kind, s, corpus, False)[0] for s in seeds)
        d = text.eval_data(kind, corpus, args.eval, 16)
        hp = dict(REFINE[kind], **({} if args.refine_steps is None else {"steps": args.refine_steps}))
        refine = (RefineConfig(hp["steps"], *d["refine"], head=text.HEAD[kind], lr=hp["lr"],
                               batch_size=text.REFINE["batch"], lr_orthogonal=hp["lr_orthogonal"])
                  if hp["steps"] > 0 else None)
        t0 = time.perf_counter()
        out = breakdown(a, b, d["example"], d["inputs"], d["labels"], text.HEAD[kind], text.WORD_EMBEDDING[kind],
                        args.points, refine, BLOCKS[kind], args.parts,
                        progress=lambda m, k=kind: log(f"[{k}] {m}"))
        out.update(seeds=seeds, refine={k: v for k, v in hp.items()}, seconds=time.perf_counter() - t0)
        results[kind] = out
        print(format_tables(out, f"{text.TITLE[kind]}, {args.steps} steps, seeds {seeds}"), flush=True)
        print(f"\n({out['seconds']:.0f} s)\n", flush=True)
    print(f"run time {time.perf_counter() - t_start:.0f} s wall ({args.threads} thread(s))")
    if args.json:
        with open(args.json, "w") as fh:
            json.dump(results, fh, indent=1, default=str)
            fh.write("\n")


if __name__ == "__main__":
    main()
