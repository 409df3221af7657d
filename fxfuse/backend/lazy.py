"""Out-of-core weights: read checkpoint tensors on demand, run models without holding them, write shards.

A model's graph and spaces need shapes only, so a model may hold its
parameters on the ``meta`` device (``offload``) while its weights stay in
safetensors files (``CheckpointTensors``, one file or shards with an index,
as Hugging Face writes them) and are read one tensor at a time. Aligned and
fused weights are ``Mapping``\\ s computed per tensor on access
(``TensorMap``), so no step holds a whole extra model:

* ``run_streamed`` runs a module whose every submodule gets its own weights
  just before its forward and gives them back after it (a forward pre-hook
  and a forward hook per submodule with direct tensors): peak memory is one
  submodule's weights plus the activations;
* ``write_shards`` writes a state shard by shard (``model-0000i-of-0000n``
  and ``model.safetensors.index.json``; one ``model.safetensors`` when it fits
  one shard).
"""
from __future__ import annotations

import json
import shutil
from contextlib import contextmanager
from pathlib import Path
from typing import Any, Callable, Iterable, Iterator, Mapping

import torch
from torch import nn

from ..core.derived import forget_derived
from ..core.errors import SpecError
from ..core.progress import bar
from ..models.checkpoint import INDEX, WEIGHTS, CheckpointTensors  # noqa: F401  (also imported from here)

SHARD_BYTES = 1024 ** 3  # bytes per output shard (at most one shard is held)


class TensorMap(Mapping[str, torch.Tensor]):
    """``keys`` with each tensor made by ``make(key)`` on access (aligned or fused weights, not held)."""

    def __init__(self, keys: Iterable[str], make: Callable[[str], torch.Tensor],
                 aliases: Mapping[str, str] | None = None):
        """``aliases``: other names of some keys (tied weights), readable but not listed."""
        self._keys, self.make = list(keys), make
        self._set = set(self._keys)
        self.aliases = {a: k for a, k in (aliases or {}).items() if k in self._set and a not in self._set}

    def __getitem__(self, key: str) -> torch.Tensor:
        if key not in self._set:
            if key not in self.aliases:
                raise KeyError(key)
            key = self.aliases[key]
        return self.make(key)

    def __contains__(self, key: object) -> bool:
        return key in self._set or key in self.aliases

    def __iter__(self) -> Iterator[str]:
        return iter(self._keys)

    def __len__(self) -> int:
        return len(self._keys)


def in_memory(state: Mapping[str, torch.Tensor]) -> bool:
    """Whether ``state`` holds its tensors (a plain dict) rather than reading them on access."""
    return isinstance(state, dict)


def offload(module: nn.Module, dtype: torch.dtype | None = None) -> nn.Module:
    """Move ``module``'s parameters and persistent buffers to ``meta`` in place (tied ones stay tied).

    ``dtype`` sets the meta tensors' floating dtype (what ``run_streamed`` computes in).
    """
    done: dict[int, torch.Tensor] = {}

    def meta(t: torch.Tensor) -> torch.Tensor:
        if id(t) not in done:
            dt = dtype if dtype is not None and t.is_floating_point() else t.dtype
            done[id(t)] = torch.empty(t.shape, dtype=dt, device="meta")
        return done[id(t)]

    for sub in module.modules():
        for name, p in list(sub._parameters.items()):
            if p is not None:
                new = done.get(id(p))
                if new is None:
                    new = done[id(p)] = nn.Parameter(meta(p), requires_grad=False)
                sub._parameters[name] = new
        for name, b in list(sub._buffers.items()):
            if b is not None and name not in sub._non_persistent_buffers_set:
                sub._buffers[name] = meta(b)
    return module


def _direct_tensors(module: nn.Module) -> dict[nn.Module, list[tuple[str, str, bool]]]:
    """``{submodule: [(attribute, state-dict name, is parameter)]}`` for its own parameters and persistent buffers."""
    out: dict[nn.Module, list[tuple[str, str, bool]]] = {}
    for prefix, sub in module.named_modules(remove_duplicate=False):
        own = [(n, True) for n, p in sub._parameters.items() if p is not None]
        own += [(n, False) for n, b in sub._buffers.items()
                if b is not None and n not in sub._non_persistent_buffers_set]
        if own and sub not in out:
            out[sub] = [(n, f"{prefix}.{n}" if prefix else n, is_param) for n, is_param in own]
    return out


def _set(sub: nn.Module, attr: str, value: torch.Tensor, is_param: bool) -> None:
    if is_param:
        sub._parameters[attr] = nn.Parameter(value, requires_grad=False)
    else:
        sub._buffers[attr] = value


@torch.no_grad()
def run_streamed(module: nn.Module, state: Mapping[str, torch.Tensor], args: tuple,
                 kwargs: Mapping[str, Any] | None = None, dtype: torch.dtype | None = None,
                 progress: Callable[[str], None] | None = None) -> Any:
    """``module(*args, **kwargs)`` with every submodule's tensors read from ``state`` around its forward.

    ``dtype``: floating tensors are cast to it (a half-precision model checked
    in float32). A state held in memory is loaded whole (no hooks), and so is
    one for a module that reads a submodule's weights outside that submodule's
    forward (a meta tensor reaches an op or the output).
    """
    owners = _direct_tensors(module)
    saved = {sub: [(attr, sub._parameters[attr] if is_param else sub._buffers[attr], is_param)
                   for attr, _, is_param in entries] for sub, entries in owners.items()}

    shown = bar(progress, "checking", len(owners))

    def load(sub: nn.Module) -> None:
        shown.update()
        for attr, name, is_param in owners[sub]:
            t = state[name]
            if dtype is not None and t.is_floating_point():
                t = t.to(dtype)
            _set(sub, attr, t, is_param)

    def release(sub: nn.Module) -> None:
        for attr, old, is_param in saved[sub]:
            if is_param:
                sub._parameters[attr] = old
            else:
                sub._buffers[attr] = old

    handles = []
    forget_derived(module)
    try:
        if not in_memory(state):
            for sub in owners:
                handles.append(sub.register_forward_pre_hook(lambda m, _a: load(m)))
                handles.append(sub.register_forward_hook(lambda m, _a, _o: release(m)))
            try:
                out = module(*args, **dict(kwargs or {}))
                if not _on_meta(out):
                    return out
            except (NotImplementedError, RuntimeError) as exc:
                if "meta" not in str(exc):
                    raise
            for h in handles:
                h.remove()
            handles = []
        for sub in owners:  # held weights, or a module that reads weights outside their module's forward
            load(sub)
        return module(*args, **dict(kwargs or {}))
    finally:
        shown.close()
        for h in handles:
            h.remove()
        for sub in owners:
            release(sub)
        forget_derived(module)  # nothing derived from ``state`` stays with the module's own weights


def _on_meta(out: Any) -> bool:
    from ..frontend.verify import output_tensors

    return any(t.device.type == "meta" for t in output_tensors(out))


def write_shards(out_dir: Path, state: Mapping[str, torch.Tensor], keys: Iterable[str],
                 nbytes: Callable[[str], int], shard_bytes: int = SHARD_BYTES,
                 progress: Callable[[str], None] | None = None) -> list[Path]:
    """Write ``state[k]`` for ``keys`` into safetensors shards of at most ``shard_bytes`` (one tensor may exceed it).

    Only one shard's tensors are held at a time. One shard is written as
    ``model.safetensors``, several as ``model-0000i-of-0000n.safetensors`` with
    ``model.safetensors.index.json`` (Hugging Face's layout).
    """
    from safetensors.torch import save_file

    keys = list(keys)
    groups: list[list[str]] = [[]]
    size = 0
    for k in keys:
        b = nbytes(k)
        if groups[-1] and size + b > shard_bytes:
            groups.append([])
            size = 0
        groups[-1].append(k)
        size += b
    n = len(groups)
    names = [WEIGHTS] if n == 1 else [f"model-{i + 1:05d}-of-{n:05d}.safetensors" for i in range(n)]
    written, total = [], sum(nbytes(k) for k in keys)
    with bar(progress, "writing", len(keys)) as shown:
        for name, group in zip(names, groups):
            tensors = {}
            for k in group:
                tensors[k] = state[k].detach().contiguous()
                shown.update()
            save_file(tensors, str(out_dir / name), metadata={"format": "pt"})
            written.append(out_dir / name)
            del tensors
    if n > 1:
        index = {"metadata": {"total_size": total},
                 "weight_map": {k: name for name, group in zip(names, groups) for k in group}}
        (out_dir / INDEX).write_text(json.dumps(index, indent=2, sort_keys=True) + "\n")
    return written


# ---------------------------------------------------------------- aligned and fused weights, per tensor


def aligned_tensors(analysis, state: Mapping[str, torch.Tensor], alignment) -> Mapping[str, torch.Tensor]:
    """``fxfuse.backend.emit.aligned_state`` of ``state``: a dict when ``state`` is held, else computed per tensor."""
    from dataclasses import replace

    from .emit import aligned_state

    if in_memory(state):
        return aligned_state(analysis, state, alignment)
    owner = {alias: name for name, layout in analysis.layouts.items() for alias in (name,) + layout.aliases}

    def make(key: str) -> torch.Tensor:
        name = owner.get(key)
        if name is None:
            return state[key]
        one = replace(analysis, layouts={name: analysis.layouts[name]})
        return aligned_state(one, {name: state[key]}, alignment)[name]

    return TensorMap(state.keys(), make, _aliases(state, owner))


def averaged_tensors(states, weights, target: int, dtype: torch.dtype | None = None) -> Mapping[str, torch.Tensor]:
    """``Σ_m w_m · state_m`` (``fxfuse.backend.emit.average_states``) per tensor on access, each state read once, in
    ``dtype`` (default: the target's); entries that are not floating come from the target, and so do entries
    of the target's checkpoint that another lacks (a buffer its class no longer loads, such as an old
    ``position_ids``: loading refuses a checkpoint that lacks a tensor the model reads)."""
    from .emit import average_states

    target %= len(states)
    like = states[target]

    def make(key: str) -> torch.Tensor:
        ref = like[key]
        if not ref.is_floating_point() or any(key not in s for s in states):
            return ref
        tensors = [ref if i == target else s[key] for i, s in enumerate(states)]  # the target's read once
        out = ref if dtype is None else ref.to(dtype)  # the average is rounded once, to ``dtype``
        return average_states([{key: x} for x in tensors], weights, {key: out})[key]

    fused = TensorMap(like.keys(), make, _aliases(like, {}))
    fused.like = like  # shapes and dtypes without making the tensors
    return fused


def _aliases(state: Mapping[str, torch.Tensor], owner: Mapping[str, str]) -> dict[str, str]:
    """Names under which ``state``'s keys are also read: its own aliases and tied names of the analysis."""
    out = dict(getattr(state, "aliases", {}))
    groups: dict[str, list[str]] = {}
    for alias, name in owner.items():
        groups.setdefault(name, []).append(alias)
    for names in groups.values():
        stored = next((n for n in names if n in state), None)
        if stored is not None:
            out.update({n: stored for n in names if n != stored})
    return out


def compute_dtype(state: Mapping[str, torch.Tensor]) -> torch.dtype | None:
    """float32 where the floating weights are half precision (checks and costs need it), else ``None``."""
    dtype_of = getattr(state, "dtype_of", None)
    for key in state:
        dt = dtype_of(key) if dtype_of is not None else state[key].dtype
        if dt.is_floating_point:
            return torch.float32 if dt in (torch.float16, torch.bfloat16) else None
    return None


# ---------------------------------------------------------------- Hugging Face directories, out of core


@contextmanager
def meta_parameters():
    """Modules built inside get their parameters on ``meta`` (buffers stay real: they are computed, not loaded)."""
    original = nn.Module.register_parameter

    def register(self, name, param):
        if param is not None and param.device.type != "meta":
            param = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)
        original(self, name, param)

    nn.Module.register_parameter = register
    try:
        yield
    finally:
        nn.Module.register_parameter = original


def load_hf_out_of_core(spec: str, dtype: torch.dtype | None = None, seed: int = 0):
    """A Hugging Face directory as ``(LoadedModel with a meta skeleton, CheckpointTensors)``.

    ``None`` where it is not one, or its tensors are not stored under the
    module's names and shapes (then it is loaded in memory, where
    transformers converts them).

    Only the config is read: the module is built with ``meta`` parameters (its
    computed buffers, such as rotary frequencies, are real), the weights stay
    in the safetensors files. ``dtype``: what the skeleton computes in.
    """
    from ..models.io import HF, LoadedModel, hf_architecture, hf_example_inputs
    from ..frontend.trace import tied_aliases

    path = Path(spec)
    if not (path.is_dir() and (path / "config.json").is_file()):
        return None
    tensors = CheckpointTensors.from_dir(path)
    if tensors is None:
        return None
    try:
        import transformers

        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
        _arch, cls = hf_architecture(transformers, config, spec)
        if cls is None:
            return None
        if hasattr(config, "use_cache"):
            config.use_cache = False
        with meta_parameters():
            module = cls(config)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"{spec}: cannot build the Hugging Face model: {type(exc).__name__}: "
                        f"{' '.join(str(exc).split())[:200]}") from None
    aliases = {other: name for name, others in tied_aliases(module).items() for other in others}
    aliases.update({name: other for other, name in list(aliases.items())})
    offload(module.eval(), dtype)
    tensors = tensors.with_aliases(aliases)
    # stored under other names (transformers converts some on loading) or other shapes: load it in memory
    if any(k not in tensors or tuple(tensors.shape_of(k)) != tuple(t.shape) for k, t in module.state_dict().items()):
        return None
    return LoadedModel(module, (), hf_example_inputs(module, seed), spec, HF), tensors


def save_hf_out_of_core(like, state: Mapping[str, torch.Tensor], out: Path, force: bool = False,
                        extra: Mapping[str, str] | None = None, dtype: torch.dtype | None = None,
                        progress: Callable[[str], None] | None = None, shard_bytes: int = SHARD_BYTES) -> Path:
    """Write ``state`` as a Hugging Face directory (``like``'s config, shards), atomically."""
    with _atomic_dir(out, force) as tmp:
        if dtype is None:  # the input's config.json byte for byte, as fxfuse.models.io.save_model keeps it
            shutil.copyfile(Path(like.spec) / "config.json", tmp / "config.json")
        else:  # the one documented change: the dtype asked for
            config = like.module.config
            config.dtype = str(dtype).removeprefix("torch.")
            config.save_pretrained(str(tmp))
        itemsize = lambda k: torch.empty((), dtype=_dtype_of(state, k, dtype)).element_size()  # noqa: E731
        nbytes = lambda k: _numel(state, k) * itemsize(k)  # noqa: E731
        write_shards(tmp, state, list(state), nbytes, shard_bytes, progress)
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
    return Path(out)


@contextmanager
def _atomic_dir(out: Path, force: bool) -> Iterator[Path]:
    """A temporary sibling directory that replaces ``out`` when the block succeeds and is removed when it fails
    (``fxfuse.models.atomic``: signals during the swap leave nothing behind)."""
    from ..models import atomic
    from ..models.io import check_output_path

    out = check_output_path(out, force, directory=True)
    tmp = atomic.temp_dir(out)
    try:
        yield tmp
        atomic.replace(tmp, out)
    except BaseException as exc:
        atomic.discard(tmp)
        raise atomic.write_failure(out, exc) from None


def _dtype_of(state, key: str, dtype: torch.dtype | None) -> torch.dtype:
    like = getattr(state, "like", None)
    base = like.dtype_of(key) if like is not None and hasattr(like, "dtype_of") else state[key].dtype
    return dtype if dtype is not None and base.is_floating_point else base


def _numel(state, key: str) -> int:
    like = getattr(state, "like", None)
    shape = like.shape_of(key) if like is not None and hasattr(like, "shape_of") else state[key].shape
    n = 1
    for s in shape:
        n *= int(s)
    return n


def open_out_of_core(specs, progress: Callable[[str], None] | None = None):
    """``(loaded models, their checkpoint tensors)`` when every spec is a safetensors Hugging Face directory of
    one architecture (twins: one class, one config), else ``([], None)`` (then the models are loaded in memory)."""
    say = progress or (lambda _msg: None)
    found = []
    for spec in specs:
        say(f"opening {spec}")
        opened = load_hf_out_of_core(spec)
        if opened is None:
            return [], None
        found.append(opened)
    strip = lambda c: {k: v for k, v in c.to_dict().items() if k not in ("_name_or_path", "dtype", "torch_dtype")}  # noqa: E731
    first = found[0][0].module
    if any(type(m.module) is not type(first) or strip(m.module.config) != strip(first.config) for m, _ in found):
        return [], None
    dtype = compute_dtype(found[0][1])
    if dtype is not None:
        for m, _ in found:
            offload(m.module, dtype)
    return [m for m, _ in found], [t for _, t in found]
