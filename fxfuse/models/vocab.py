"""Models with different vocabularies: rows matched by token string.

    tokenizer.json of each model ──read_vocab──▶ token strings by id
    vocabularies ──match(mode)──▶ VocabMatch      the chosen vocabulary, each model's row for each token
    module ──reindex──▶ module                     vocab-axis tensors in the chosen order, missing rows zero
    fused state ──per_row_average──▶ state         each row averaged over the models that have its token

The chosen vocabulary ``T`` (``V'`` tokens) is the target's (``mode="target"``:
its rows in its order; a source's other tokens are dropped) or the union
(``mode="union"``: the target's rows, then each source's tokens that no earlier
model has, in model and id order). Model ``m`` gets ``index_m ∈ {-1, 0, …,
V_m - 1}^{V'}``: its row of token ``T_j``, or ``-1``. Re-indexing a model
gathers its input embedding ``E ∈ R^{V_m × d}`` and output embedding (LM head
``W ∈ R^{V_m × d}``, bias ``b ∈ R^{V_m}``) into ``E'_j = E[index_m[j]]`` and
``0`` where ``index_m[j] = -1``: for every token it has, the model computes
what it did (the self-check runs on shared tokens), and a zero row adds
nothing to a weight-matching cost ``Σ_j ⟨E^a_j, P E^b_j⟩``, so the hidden axes
are aligned on the shared rows alone. The fused row is
``Σ_m w_m h_mj P_m(E^m_j) / Σ_m w_m h_mj`` (``h_mj = 1`` where model ``m`` has
token ``j``): a shared row is averaged, a row one model has is that model's row
moved into the target's basis.
"""
from __future__ import annotations

import copy
import json
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Mapping, Sequence

import torch
from torch import nn

from ..core.errors import FxfuseError

MODES = ("target", "union")
TOKENIZER = "tokenizer.json"
TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json", "merges.txt",
                   "vocab.txt", "added_tokens.json")  # text files a Hugging Face tokenizer is saved as
UNION_FILES = ("tokenizer_config.json", "special_tokens_map.json")  # beside a union tokenizer.json (no slow files)


class VocabError(FxfuseError):
    """Vocabularies that cannot be matched; one line naming the model (directory)."""


def read_vocab(folder: str | Path) -> tuple[str, ...]:
    """The token strings of ``folder/tokenizer.json`` in id order (added tokens included); ids must run 0…n-1."""
    path = Path(folder) / TOKENIZER
    if not path.is_file():
        raise VocabError(f"{folder}: no {TOKENIZER} to match its vocabulary by token string")
    try:
        from tokenizers import Tokenizer

        vocab = Tokenizer.from_file(str(path)).get_vocab(with_added_tokens=True)
    except ImportError:
        raise VocabError(f"{folder}: matching vocabularies needs the tokenizers package: pip install tokenizers") \
            from None
    except Exception as exc:  # the library's parse errors
        raise VocabError(f"{path}: unreadable tokenizer: {' '.join(str(exc).split())[:200]}") from None
    by_id = sorted((i, t) for t, i in vocab.items())
    if [i for i, _ in by_id] != list(range(len(by_id))):
        raise VocabError(f"{path}: token ids are not 0…{len(by_id) - 1} without gaps")
    return tuple(t for _, t in by_id)


@dataclass(frozen=True)
class VocabMatch:
    """The chosen vocabulary and where each model's rows go.

    ``tokens``: ``V'`` token strings (``None``: a target row beyond its tokenizer, kept as is);
    ``index``: per model a ``(V',)`` long tensor, the model's row of each token or ``-1``;
    ``sizes``: each model's vocabulary rows ``V_m``; ``where``: each model's name for messages.
    """

    mode: str
    tokens: tuple[str | None, ...]
    index: tuple[torch.Tensor, ...]
    sizes: tuple[int, ...]
    target: int
    where: tuple[str, ...]

    @property
    def has(self) -> torch.Tensor:
        """``(M, V')`` bool: whether model ``m`` has token ``j``."""
        return torch.stack([i >= 0 for i in self.index])

    @property
    def shared_ids(self) -> torch.Tensor:
        """Ids (in the chosen vocabulary) of the tokens every model has, ascending."""
        return torch.nonzero(self.has.all(0)).flatten()

    @property
    def identity(self) -> bool:
        """Whether every model already has the chosen vocabulary in its order (nothing to re-index)."""
        n = len(self.tokens)
        return all(s == n for s in self.sizes) and all(bool((i == torch.arange(n)).all()) for i in self.index)

    def report(self) -> dict:
        """Counts for the report and the model card."""
        has = self.has
        return {"mode": self.mode, "size": len(self.tokens), "shared": int(has.all(0).sum()),
                "models": [{"model": m, "rows": self.sizes[m], "kept": int(has[m].sum()),
                            "shared_with_target": int((has[m] & has[self.target]).sum())}
                           for m in range(len(self.sizes))]}


def match(vocabs: Sequence[Sequence[str]], sizes: Sequence[int], target: int, mode: str,
          where: Sequence[str] | None = None) -> VocabMatch:
    """Match ``vocabs`` (token strings by id; model ``m`` has ``sizes[m] ≥ len(vocabs[m])`` rows) by string."""
    if mode not in MODES:
        raise VocabError(f"unknown vocabulary mode {mode!r} (one of {', '.join(MODES)})")
    where = tuple(where or (f"model {m}" for m in range(len(vocabs))))
    for m, (v, n) in enumerate(zip(vocabs, sizes)):
        if len(v) > n:
            raise VocabError(f"{where[m]}: the tokenizer has {len(v)} tokens, the model only {n} embedding rows")
        if len(set(v)) != len(v):
            raise VocabError(f"{where[m]}: the tokenizer names a token twice")
    tgt = vocabs[target]
    tokens: list[str | None] = list(tgt) + [None] * (sizes[target] - len(tgt))
    if mode == "union":
        seen = set(tgt)
        for m, v in enumerate(vocabs):
            if m != target:
                new = [t for t in v if t not in seen]
                tokens += new
                seen.update(new)
    index = []
    for m, v in enumerate(vocabs):
        if m == target:
            row = list(range(sizes[target])) + [-1] * (len(tokens) - sizes[target])
        else:
            ids = {t: i for i, t in enumerate(v)}
            row = [ids.get(t, -1) if t is not None else -1 for t in tokens]
        index.append(torch.tensor(row, dtype=torch.long))
    found = VocabMatch(mode, tuple(tokens), tuple(index), tuple(int(s) for s in sizes), target, where)
    for m in range(len(vocabs)):
        if m != target and not bool((found.index[m] >= 0).any()):
            raise VocabError(f"{where[m]}: shares no token with the target ({where[target]})")
    if found.shared_ids.numel() == 0:
        raise VocabError(f"{', '.join(where)}: no token is shared by every model")
    return found


# ---------------------------------------------------------------- models


def vocab_tensors(module: nn.Module, spec: str = "model") -> list[nn.Parameter]:
    """The parameters with a vocabulary axis first: input embedding, output embedding and its bias (once each)."""
    get_in = getattr(module, "get_input_embeddings", None)
    emb = get_in() if callable(get_in) else None
    if not isinstance(getattr(emb, "weight", None), torch.Tensor):
        raise VocabError(f"{spec}: matching vocabularies needs a model with get_input_embeddings() "
                         f"(a Hugging Face model); {type(module).__name__} has none")
    out = []
    get_out = getattr(module, "get_output_embeddings", None)
    head = get_out() if callable(get_out) else None
    for p in (emb.weight, getattr(head, "weight", None), getattr(head, "bias", None)):
        if isinstance(p, nn.Parameter) and all(p is not q for q in out):
            out.append(p)
    rows = emb.weight.shape[0]
    for p in out:
        if p.shape[0] != rows:
            raise VocabError(f"{spec}: an output embedding has {p.shape[0]} rows, the input embedding {rows}")
    return out


def vocab_size(module: nn.Module, spec: str = "model") -> int:
    return int(vocab_tensors(module, spec)[0].shape[0])


def reindex(module: nn.Module, index: torch.Tensor, spec: str = "model") -> nn.Module:
    """A copy of ``module`` whose vocabulary tensors hold rows ``index`` (``-1``: zero), ties kept.

    Every reference to a vocabulary parameter (a tied head, a bias held twice) is replaced by the one new
    parameter; ``config.vocab_size``, ``num_embeddings``, ``out_features`` and ``padding_idx`` follow.
    """
    moved = copy.deepcopy(module)
    olds = vocab_tensors(moved, spec)
    keep = (index >= 0).to(olds[0].dtype)
    new = {}
    for p in olds:
        rows = p.detach()[index.clamp(min=0)]
        rows = rows * keep.reshape(-1, *([1] * (rows.dim() - 1)))
        new[id(p)] = nn.Parameter(rows.contiguous(), requires_grad=p.requires_grad)
    for name, p in list(moved.named_parameters(remove_duplicate=False)):
        if id(p) in new:
            owner_name, _, leaf = name.rpartition(".")
            setattr(moved.get_submodule(owner_name) if owner_name else moved, leaf, new[id(p)])
    n = int(index.shape[0])
    for sub in moved.modules():
        if isinstance(sub, nn.Embedding) and any(sub.weight is q for q in new.values()):
            sub.num_embeddings = n
            if sub.padding_idx is not None:
                at = torch.nonzero(index == sub.padding_idx).flatten()
                sub.padding_idx = int(at[0]) if at.numel() else None
        if isinstance(sub, nn.Linear) and any(sub.weight is q for q in new.values()):
            sub.out_features = n
    config = getattr(moved, "config", None)
    if config is not None and hasattr(config, "vocab_size"):
        config.vocab_size = n
    return moved


def vocab_keys(module: nn.Module) -> tuple[str, ...]:
    """State-dict keys of ``module``'s vocabulary tensors (every name of a tied one)."""
    params = vocab_tensors(module)
    return tuple(sorted(name for name, p in module.named_parameters(remove_duplicate=False)
                        if any(p is q for q in params)))


def shared_inputs(kwargs: Mapping, args: tuple, shared: torch.Tensor) -> tuple[tuple, dict]:
    """Example inputs whose token ids (``input_ids``, ``decoder_input_ids``, an integer first argument) are
    moved onto shared tokens, ``shared[id mod |shared|]``: every model computes what it did on them."""
    def move(x):
        return shared[x.remainder(shared.numel())].to(x.dtype)

    kwargs = {k: move(v) if k in ("input_ids", "decoder_input_ids") and isinstance(v, torch.Tensor) else v
              for k, v in kwargs.items()}
    args = tuple(move(a) if i == 0 and isinstance(a, torch.Tensor) and not a.is_floating_point() else a
                 for i, a in enumerate(args))
    return args, kwargs


@dataclass(frozen=True)
class Matched:
    """Models brought to one vocabulary: the re-indexed modules, example inputs on shared tokens, the match,
    and the state-dict keys whose rows are averaged per row."""

    models: tuple[nn.Module, ...]
    args: tuple
    kwargs: dict
    match: VocabMatch
    keys: tuple[str, ...]
    notes: tuple[str, ...] = ()


def prepare(models: Sequence[nn.Module], vocabs: Sequence[Sequence[str]] | None, target: int, mode: str,
            args: tuple, kwargs: Mapping | None, where: Sequence[str] | None = None) -> Matched:
    """Match the vocabularies and re-index every model into the chosen one (``vocabs``: token strings by id
    per model; ``None``: every model's rows are taken as one vocabulary, which then needs equal sizes)."""
    where = tuple(where or (f"model {m}" for m in range(len(models))))
    sizes = [vocab_size(m, w) for m, w in zip(models, where)]
    if vocabs is None:
        if len(set(sizes)) > 1:
            raise VocabError(f"{where[sizes.index(max(sizes))]}: vocabularies of {', '.join(map(str, sizes))} rows "
                             "need token strings to be matched (give each model's tokens)")
        vocabs = [[str(i) for i in range(sizes[0])]] * len(models)
    if len(vocabs) != len(models):
        raise VocabError(f"{len(vocabs)} vocabularies for {len(models)} models")
    found = match(vocabs, sizes, target, mode, where)
    if found.identity:
        moved = tuple(models)
    else:
        moved = tuple(reindex(m, i, w) for m, i, w in zip(models, found.index, where))
    args, kw = shared_inputs(dict(kwargs or {}), tuple(args), found.shared_ids)
    return Matched(moved, args, kw, found, vocab_keys(moved[target]))


def per_row_average(state: dict[str, torch.Tensor], found: VocabMatch, keys: Sequence[str],
                    weights: Sequence[float]) -> dict[str, torch.Tensor]:
    """``state`` (``Σ_m w_m · aligned_m``, missing rows zero) with each vocabulary row divided by the weight of
    the models that have its token, ``Σ_m w_m h_mj``: the per-row weighted average."""
    cover = (torch.tensor([float(w) for w in weights], dtype=torch.float64)[:, None] * found.has).sum(0)
    out = dict(state)
    for key in (k for k in keys if k in state):
        t = state[key]
        scale = (1.0 / cover.clamp(min=1e-300)).to(torch.promote_types(t.dtype, torch.float32))
        out[key] = (t.to(scale.dtype) * scale.reshape(-1, *([1] * (t.dim() - 1)))).to(t.dtype)
    return out


# ---------------------------------------------------------------- tokenizer files


def tokenizer_files(found: VocabMatch, folders: Sequence[str | Path]) -> dict[str, str]:
    """The output's tokenizer files as ``{name: text}``: the target's files (mode target), or a
    ``tokenizer.json`` whose vocabulary is the union (ids as in ``found.tokens``) beside the target's
    ``tokenizer_config.json`` and ``special_tokens_map.json`` (mode union)."""
    src = Path(folders[found.target])
    names = TOKENIZER_FILES if found.mode == "target" else UNION_FILES
    files = {n: (src / n).read_text(encoding="utf-8") for n in names if (src / n).is_file()}
    if found.mode == "union":
        files[TOKENIZER] = union_tokenizer(found, folders)
    return files


def _merges(model: dict) -> list:
    return list(model.get("merges") or [])


def union_tokenizer(found: VocabMatch, folders: Sequence[str | Path]) -> str:
    """The target's ``tokenizer.json`` with the union vocabulary (WordLevel, WordPiece, BPE: its merges then the
    sources' other merges; Unigram: the sources' scores); checked to read back as ``found.tokens``."""
    target_path = Path(folders[found.target]) / TOKENIZER
    data = json.loads(target_path.read_text(encoding="utf-8"))
    model = data.get("model") or {}
    kind = model.get("type")
    ids = {t: j for j, t in enumerate(found.tokens) if t is not None}  # added tokens too, as the target's file
    if kind in ("WordLevel", "WordPiece", "BPE"):
        model["vocab"] = ids
        if kind == "BPE":
            merges = _merges(model)
            seen = {json.dumps(x) for x in merges}
            for m, folder in enumerate(folders):
                if m == found.target:
                    continue
                other = json.loads((Path(folder) / TOKENIZER).read_text(encoding="utf-8")).get("model") or {}
                for x in _merges(other):
                    if json.dumps(x) not in seen:
                        merges.append(x)
                        seen.add(json.dumps(x))
            model["merges"] = merges
    elif kind == "Unigram":
        scores = {}
        for folder in reversed([f for m, f in enumerate(folders)]):
            other = json.loads((Path(folder) / TOKENIZER).read_text(encoding="utf-8")).get("model") or {}
            scores.update({t: s for t, s in other.get("vocab") or ()})
        if any(t is None for t in found.tokens):
            raise VocabError(f"{target_path}: a Unigram vocabulary cannot skip the target's unnamed rows")
        model["vocab"] = [[t, scores.get(t, 0.0)] for t in found.tokens]
    else:
        raise VocabError(f"{target_path}: cannot write a union vocabulary for a {kind} tokenizer model "
                         "(WordLevel, WordPiece, BPE, Unigram); use --vocab target")
    # added (special) tokens of the sources that the target lacks become ordinary tokens of the vocabulary
    for a in data.get("added_tokens") or ():
        if found.tokens[a["id"]] != a["content"] if a["id"] < len(found.tokens) else True:
            raise VocabError(f"{target_path}: added token {a['content']!r} is not at id {a['id']}")
    data["model"] = model
    text = json.dumps(data, ensure_ascii=False, indent=2) + "\n"
    from tokenizers import Tokenizer

    got = Tokenizer.from_str(text).get_vocab(with_added_tokens=True)
    want = {t: j for j, t in enumerate(found.tokens) if t is not None}
    if got != want:
        raise VocabError(f"{target_path}: the union tokenizer does not read back as the union vocabulary "
                         f"({len(got)} tokens for {len(want)})")
    return text


def config_text(folder: str | Path, vocab_size: int) -> str:
    """The target's ``config.json`` with ``vocab_size`` set (a union vocabulary has more rows)."""
    config = json.loads((Path(folder) / "config.json").read_text(encoding="utf-8"))
    config["vocab_size"] = vocab_size
    return json.dumps(config, indent=2, sort_keys=True) + "\n"


def prepare_models(models: Sequence[nn.Module], vocabularies: Sequence | None, target: int, mode: str,
                   args: tuple, kwargs: Mapping | None, calib=None) -> Matched:
    """``prepare`` for ``fxfuse.compile``: ``vocabularies`` holds token lists or model directories (their
    ``tokenizer.json`` is read, and errors name the directory); a note where the calibration inputs
    ``calib`` hold tokens that some model lacks (it reads a zero row for them)."""
    models = list(models)
    if not -len(models) <= target < len(models):
        raise VocabError(f"--target {target} is out of range for {len(models)} models")
    where = [f"model {m}" for m in range(len(models))]
    vocabs = None
    if vocabularies is not None:
        vocabs = []
        for m, v in enumerate(vocabularies):
            if isinstance(v, (str, Path)):
                where[m] = str(v)
                vocabs.append(read_vocab(v))
            else:
                vocabs.append(tuple(v))
    matched = prepare(models, vocabs, target % len(models), mode, args, kwargs, where)
    note = calibration_note(matched.match, calib)
    return replace(matched, notes=(note,)) if note else matched


def calibration_note(found: VocabMatch, calib) -> str | None:
    """A note when calibration token ids (a tensor, or ``input_ids`` of named inputs) hold tokens some model
    lacks: that model reads a zero embedding row there, which is not what it computes on its own tokens."""
    ids = calib.get("input_ids") if isinstance(calib, Mapping) else calib
    if not isinstance(ids, torch.Tensor) or ids.is_floating_point() or ids.numel() == 0:
        return None
    inside = (ids >= 0) & (ids < len(found.tokens))
    shared = torch.zeros(len(found.tokens), dtype=torch.bool)
    shared[found.shared_ids] = True
    lacking = int((~shared[ids[inside]]).sum())
    if not lacking:
        return None
    return (f"{lacking / ids.numel():.1%} of the calibration tokens are missing from some model's vocabulary (it "
            "reads a zero embedding row there): calibrate on text made of shared tokens")


# ---------------------------------------------------------------- the command line


def check_specs(specs: Sequence[str], mode: str | None, target: int = 0) -> None:
    """Before loading: with ``mode``, every spec must be a directory with a readable ``tokenizer.json`` sharing
    tokens with the target's; without, Hugging Face directories whose ``config.json`` vocabulary sizes differ
    are refused in one line."""
    if mode is not None:
        vocabs = [read_vocab(spec) for spec in specs]
        if -len(specs) <= target < len(specs):
            match(vocabs, [len(v) for v in vocabs], target % len(specs), mode, specs)
        return
    sizes = []
    for spec in specs:
        try:
            size = json.loads((Path(spec) / "config.json").read_text(encoding="utf-8")).get("vocab_size")
        except (OSError, ValueError, AttributeError):
            return  # not a Hugging Face directory: its loader speaks for it
        if not isinstance(size, int):
            return
        sizes.append(size)
    if len(set(sizes)) > 1:
        shown = ", ".join(map(str, sizes))
        for spec in specs:
            if not (Path(spec) / TOKENIZER).is_file():
                raise VocabError(f"{spec}: no {TOKENIZER}, and the vocabularies differ in size ({shown} tokens): "
                                 "their rows cannot be matched by token string")
        big = specs[sizes.index(max(sizes))]
        raise VocabError(f"{big}: the vocabularies differ in size ({shown} tokens): pass --vocab target or "
                         "--vocab union to match their rows by token string")
    _check_same_tokens(specs, target)


def _check_same_tokens(specs: Sequence[str], target: int) -> None:
    """Without ``--vocab``, rows are fused by id: Hugging Face directories whose tokenizers give the same id to
    different tokens are refused in one line (their rows would average different tokens)."""
    if not -len(specs) <= target < len(specs) or not all((Path(s) / TOKENIZER).is_file() for s in specs):
        return
    try:
        import tokenizers  # noqa: F401  (with transformers; without it, nothing to compare)
    except ImportError:
        return
    target %= len(specs)
    ref = read_vocab(specs[target])
    for spec in specs[:target] + specs[target + 1:]:
        tokens = read_vocab(spec)
        differ = sum(a != b for a, b in zip(tokens, ref)) + abs(len(tokens) - len(ref))
        if differ:
            raise VocabError(f"{spec}: its tokenizer gives {differ} of {max(len(tokens), len(ref))} ids other tokens "
                             f"than {specs[target]}'s: pass --vocab target or --vocab union to match their rows "
                             "by token string")


def output_files(specs: Sequence[str], modules: Sequence[nn.Module], target: int, mode: str) -> dict[str, str]:
    """The files a compile output adds for ``mode``: the tokenizer files of the chosen vocabulary, and the
    target's ``config.json`` with the new ``vocab_size`` where it changed."""
    sizes = [vocab_size(m, s) for m, s in zip(modules, specs)]
    found = match([read_vocab(s) for s in specs], sizes, target, mode, specs)
    files = tokenizer_files(found, specs)
    if len(found.tokens) != sizes[target] and (Path(specs[target]) / "config.json").is_file():
        files["config.json"] = config_text(specs[target], len(found.tokens))
    return files
