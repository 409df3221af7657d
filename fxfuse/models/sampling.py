"""Token sequences sampled from the parents: data for the data-aware stages without a dataset.

A causal LM ``f`` maps token ids ``x`` of shape ``(N, T)`` to logits ``(N, T, V)``
whose row ``t`` reads ``x[:, :t+1]`` only. With ``M`` parents, sequence ``i`` is
drawn from parent ``m = i mod M`` (the mixture of the parents' sequence
distributions, one forward per token):

    x_0 ~ U{0, …, V − 1},    x_{t+1} ~ softmax(f_m(x)[t] / τ)      (t = 0 … T − 2)

Token ``t + 1`` is drawn from a forward on the prefix ``x[:, :t+1]`` (about half
the work of whole sequences) where every model gives the same logits on a
prefix as on the whole sequence; else on the whole ``(n, T)`` batch, the
positions after ``t`` still zero, which a causal model's row ``t`` ignores (a
model traced at one shape). Both are checked first: a model whose row ``t``
moves with a later token is refused.
``T`` is ``length``, else the positions a Hugging Face config allows, at most
``DEFAULT_LENGTH``, else the example's length. Batches hold at most ``LOGITS_BYTES`` of float32 logits.
The draws use one ``torch.Generator`` seeded with ``seed``: the same parents and
seed give the same sequences.

The sequences serve as calibration inputs and, labelled by themselves (causal
LM: position ``t`` predicts token ``t + 1``), as refinement data: the stages then
fit the fused model to what the parents say, scored on held-out sequences.
"""
from __future__ import annotations

from typing import Any, Callable, Mapping, Sequence

import torch
from torch import nn

from ..core.errors import FxfuseError
from .calibration import batched_inputs, forward_names, with_input
from .evaluate import logits_of

LOGITS_BYTES = 256 * 2 ** 20   # float32 logits of one sampling batch, at most
CAUSAL_TOL = 1e-4              # relative change of an earlier row that a later token may cause
TEMPERATURE = 1.0
DEFAULT_LENGTH = 64            # tokens per sequence where the config allows it and none is asked for


class SamplingError(FxfuseError):
    """Models that sequences cannot be sampled from (not causal LMs over token ids)."""


def _token_slot(model: nn.Module, args: tuple, kwargs: Mapping[str, Any]):
    """The one batched input: integer token ids ``(B, T)``."""
    slots = batched_inputs(args, kwargs, forward_names(model)[0])
    if len(slots) != 1:
        raise SamplingError(f"--sample draws token sequences: the models take {len(slots)} batched inputs "
                            f"({', '.join(s.name for s in slots)}); sampling needs token ids (N, T) alone")
    x = slots[0].example
    if x.dim() != 2 or x.is_floating_point() or x.is_complex():
        raise SamplingError(f"--sample draws token sequences: the models' input '{slots[0].name}' is "
                            f"{str(x.dtype).replace('torch.', '')} of shape {tuple(x.shape)}, not token ids (N, T)")
    return slots[0]


def default_length(model: nn.Module, example_length: int) -> int:
    """``min(positions, DEFAULT_LENGTH)`` where a Hugging Face config gives the positions, else the example's."""
    config = getattr(model, "config", None)
    positions = next((getattr(config, k) for k in ("max_position_embeddings", "n_positions")
                      if isinstance(getattr(config, k, None), int)), None)
    return min(positions, DEFAULT_LENGTH) if positions else example_length


def _logits(model: nn.Module, args: tuple, kwargs: Mapping[str, Any], key, x: torch.Tensor) -> torch.Tensor:
    a, kw = with_input(args, kwargs, key, x)
    return logits_of(model(*a, **kw)).float()


def _same(a: torch.Tensor, b: torch.Tensor) -> bool:
    return float((a - b).abs().max()) <= CAUSAL_TOL * max(1.0, float(a.abs().max()))


def _on_prefixes(model: nn.Module, args, kwargs, key, x: torch.Tensor, out: torch.Tensor) -> bool:
    """Whether ``model`` runs on prefixes of ``x`` (lengths 1 and ``T/2``) and gives there the rows of ``out``."""
    try:
        return all(_same(out[:, :k], _logits(model, args, kwargs, key, x[:, :k])) for k in (1, x.shape[1] // 2))
    except Exception:  # noqa: BLE001 - a model traced at one shape: sampled on whole sequences instead
        return False


def _check_causal(models: Sequence[nn.Module], names: Sequence[str], args, kwargs, key, x: torch.Tensor,
                  g: torch.Generator) -> tuple[int, bool]:
    """``(V, prefixes)``: the size of every model's logits, and whether every model can be run on prefixes;
    each model's row ``t < T/2`` must stay unchanged by new tokens after it, and every token it may predict
    must be one it reads."""
    n, length = x.shape
    half = length // 2
    later, vocab, prefixes = None, None, True
    for model, name in zip(models, names):
        out = _logits(model, args, kwargs, key, x)
        if out.dim() != 3 or tuple(out.shape[:2]) != (n, length):
            raise SamplingError(f"--sample: {name} returns logits of shape {tuple(out.shape)} for token ids of shape "
                                f"{(n, length)}; sampling needs a language model's (N, T, V)")
        if vocab is not None and out.shape[-1] != vocab:
            raise SamplingError(f"--sample: {name} predicts {out.shape[-1]} tokens, the first model {vocab}")
        vocab = int(out.shape[-1])
        if later is None:
            later = x.clone()
            later[:, half:] = torch.randint(0, vocab, (n, length - half), generator=g, dtype=x.dtype)
            later[:, -1] = vocab - 1  # the largest token a draw may give
        try:
            moved = _logits(model, args, kwargs, key, later)
        except (IndexError, RuntimeError) as exc:
            raise SamplingError(f"--sample: {name} predicts {vocab} tokens but cannot read token {vocab - 1} "
                                f"({type(exc).__name__}); sampling feeds its predictions back as inputs") from None
        if not _same(out[:, :half], moved[:, :half]):
            diff = float((out[:, :half] - moved[:, :half]).abs().max())
            raise SamplingError(f"--sample: {name} is not a causal LM (its logits at a position changed by {diff:.2g} "
                                "when only later tokens did); sampling needs causal language models")
        prefixes = prefixes and _on_prefixes(model, args, kwargs, key, x, out)
    return vocab, prefixes


@torch.no_grad()
def sample_sequences(models: Sequence[nn.Module], args: tuple, kwargs: Mapping[str, Any] | None, n: int,
                     seed: int = 0, names: Sequence[str] | None = None, temperature: float = TEMPERATURE,
                     progress: Callable[[str], None] | None = None, length: int | None = None) -> torch.Tensor:
    """``n`` token sequences ``(n, T)`` drawn from the parents (module docstring).

    ``args``/``kwargs``: an example the models run on (its token ids give the dtype); ``names``: how
    messages call each model; ``length``: ``T`` (default ``default_length``).
    """
    if n < 1:
        raise SamplingError(f"--sample {n}: need at least one sequence")
    if not models:
        raise SamplingError("--sample: no model to sample from")
    kwargs = dict(kwargs or {})
    names = list(names or (f"model {i}" for i in range(len(models))))
    slot = _token_slot(models[0], tuple(args), kwargs)
    length = int(length or default_length(models[0], int(slot.example.shape[1])))
    if length < 2:
        raise SamplingError(f"--sample-length {length}: need at least 2 tokens")
    example = torch.zeros((2, length), dtype=slot.example.dtype)
    g = torch.Generator().manual_seed(seed)
    modes = [m.training for m in models]
    for m in models:
        m.eval()
    try:
        check = torch.Generator().manual_seed(seed)  # the draws below do not depend on the check's
        probe = torch.randint(0, 2, example.shape, generator=check, dtype=example.dtype)
        vocab, prefixes = _check_causal(models, names, tuple(args), kwargs, slot.key, probe, check)
        out = torch.zeros((n, length), dtype=example.dtype)
        out[:, 0] = torch.randint(0, vocab, (n,), generator=g, dtype=example.dtype)
        batch = max(1, min(n, LOGITS_BYTES // (4 * length * vocab)))
        done, total = 0, n * (length - 1)
        for m, model in enumerate(models):
            rows = torch.arange(m, n, len(models))
            for start in range(0, len(rows), batch):
                idx = rows[start:start + batch]
                x = out[idx]
                every = max(1, (length - 1) // 4)
                for t in range(length - 1):
                    ctx = x[:, :t + 1] if prefixes else x
                    logits = _logits(model, tuple(args), kwargs, slot.key, ctx)[:, t] / temperature
                    x[:, t + 1] = torch.multinomial(torch.softmax(logits, -1), 1, generator=g).squeeze(1)
                    if progress is not None and ((t + 1) % every == 0 or t == length - 2):
                        share = (done + len(idx) * (t + 1)) * 100 // total
                        progress(f"sampling {n} sequences of {length} tokens from the parents: {share}%")
                out[idx] = x
                done += len(idx) * (length - 1)
    finally:
        for m, mode in zip(models, modes):
            m.train(mode)
    return out


def labelled_by_themselves(config, x: torch.Tensor):
    """A ``fxfuse.backend.refine.RefineConfig`` on the sampled sequences ``x`` as a causal LM's data."""
    from dataclasses import replace

    return replace(config, inputs=x, labels=x.clone(), head=config.head or "causal")
