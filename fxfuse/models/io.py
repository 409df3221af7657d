"""Model specs: load a model and example inputs; save one atomically.

A spec is one of:

* a Hugging Face model directory (``config.json`` + safetensors), loaded
  offline; example inputs are made from its config;
* an fxfuse model directory (``fxfuse.json`` naming a factory and its kwargs, or
  the pickle the model came from, and a weights file), as ``fxfuse permute`` /
  ``compile`` write for non-HF models; its ``file.py:factory`` (or pickle) is
  written relative to that directory and read from it (so the two can move
  together);
* ``package.module:factory`` or ``path/to/file.py:factory``, optionally
  ``@weights.safetensors`` (or a ``.pt``/``.bin`` state dict, read with
  ``weights_only=True``). The factory returns a module, ``(module, args)`` or
  ``(module, args, kwargs)``; a bare module needs an ``example_inputs()`` method;
* a pickled module file (``.pt``/``.pth``/``.pkl``), only with ``trust_pickle``.
"""
from __future__ import annotations

import importlib
import importlib.util
import json
import os
import shutil
import sys
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Mapping

import torch
from torch import nn

from ..core.checks import one_line
from ..core.errors import SpecError
from . import atomic

MANIFEST = "fxfuse.json"
WEIGHTS = "model.safetensors"
HF, FACTORY, PICKLE = "hf", "factory", "pickle"


@dataclass(frozen=True)
class LoadedModel:
    """A model with example inputs and where it came from (to save a result the same way)."""

    module: nn.Module
    args: tuple
    kwargs: Mapping[str, Any]
    spec: str
    source: str  # HF, FACTORY or PICKLE
    factory: str | None = None  # the factory, or the pickle file (absolute path)
    factory_kwargs: Mapping[str, Any] = field(default_factory=dict)


def load_model(spec: str, trust_pickle: bool = False, seed: int = 0) -> LoadedModel:
    """Resolve ``spec`` (see module doc); raises ``SpecError`` with one line on failure."""
    path = Path(spec)
    _check_loops(path, spec)
    if path.is_dir():
        if (path / MANIFEST).is_file():
            return _load_manifest_dir(path, spec, trust_pickle)
        if (path / "config.json").is_file():
            return _load_hf(path, spec, seed)
        raise SpecError(f"{spec}: directory has neither config.json (Hugging Face) nor {MANIFEST}")
    if path.is_file() and path.suffix in {".pt", ".pth", ".pkl", ".bin"}:
        return _load_pickle(path, spec, trust_pickle)
    if ":" in spec:
        target, _, weights = spec.partition("@")
        return _load_factory(target, weights or None, spec)
    if not path.exists():
        raise SpecError(f"{spec}: no such file or directory, and not a 'package.module:factory' spec")
    raise SpecError(f"{spec}: not a model directory, a pickled module or a 'package.module:factory' spec")


def _check_loops(path: Path, spec: str) -> None:
    """A spec, or a file of its directory, that is a symlink loop: one line saying so (not "no such file")."""
    from ..core.guard import loop_in, loop_text

    for p in (path, *(path / n for n in (MANIFEST, WEIGHTS, "config.json", "model.safetensors.index.json"))):
        loop = loop_in(p)
        if loop is not None:
            raise SpecError(f"{spec}: {loop_text(path, loop)}")
        if p == path and not path.is_dir():
            return


# ---------------------------------------------------------------- factories


def resolve_factory(target: str, spec: str) -> Callable:
    modname, _, attr = target.rpartition(":")
    if not modname or not attr:
        raise SpecError(f"{spec}: expected 'package.module:factory'")
    try:
        if modname.endswith(".py"):
            file = Path(modname)
            if not file.is_file():
                raise SpecError(f"{spec}: no such file {modname}")
            name = f"_fxfuse_spec_{file.stem}_{abs(hash(str(file.resolve())))}"
            module = sys.modules.get(name)
            if module is None:
                loader_spec = importlib.util.spec_from_file_location(name, file)
                module = importlib.util.module_from_spec(loader_spec)
                sys.modules[name] = module
                loader_spec.loader.exec_module(module)
        else:
            module = importlib.import_module(modname)
    except SpecError:
        raise
    except Exception as exc:
        raise SpecError(f"{spec}: cannot import {modname}: {type(exc).__name__}: {exc}") from None
    fn = getattr(module, attr, None)
    if not callable(fn):
        raise SpecError(f"{spec}: {modname} has no callable '{attr}'")
    return fn


def _call_factory(fn: Callable, kwargs: Mapping[str, Any], spec: str) -> tuple[nn.Module, tuple, dict]:
    try:
        made = fn(**kwargs)
    except Exception as exc:
        raise SpecError(f"{spec}: factory failed: {type(exc).__name__}: {exc}") from None
    if isinstance(made, nn.Module):
        example = getattr(made, "example_inputs", None)
        if not callable(example):
            raise SpecError(f"{spec}: factory returned a module without example inputs; "
                            "return (module, args) or give the module an example_inputs() method")
        made = (made, tuple(example()))
    if not (isinstance(made, tuple) and 2 <= len(made) <= 3 and isinstance(made[0], nn.Module)):
        raise SpecError(f"{spec}: factory must return a module, (module, args) or (module, args, kwargs)")
    module, args = made[0], tuple(made[1])
    kw = dict(made[2]) if len(made) == 3 else {}
    return module.eval(), args, kw


def _load_factory(target: str, weights: str | None, spec: str,
                  factory_kwargs: Mapping[str, Any] | None = None) -> LoadedModel:
    fn = resolve_factory(target, spec)
    module, args, kwargs = _call_factory(fn, factory_kwargs or {}, spec)
    if weights:
        load_weights(module, Path(weights), spec)
    return LoadedModel(module, args, kwargs, spec, FACTORY, _absolute_file(target), dict(factory_kwargs or {}))


def _absolute_file(target: str) -> str:
    """``file.py:factory`` with the file's absolute path, so that a manifest resolves from any directory."""
    modname, _, attr = target.rpartition(":")
    return f"{Path(modname).resolve()}:{attr}" if modname.endswith(".py") else target


def _load_manifest_dir(path: Path, spec: str, trust_pickle: bool = False) -> LoadedModel:
    try:
        manifest = json.loads((path / MANIFEST).read_text())
        key = "pickle" if "pickle" in manifest else "factory"
        target = manifest[key]
        if not isinstance(target, str):
            raise TypeError(f"'{key}' must be a string, not {type(target).__name__}")
    except (OSError, ValueError, KeyError, TypeError) as exc:
        raise SpecError(f"{path / MANIFEST}: unreadable manifest ({type(exc).__name__}: {exc})") from None
    weights = path / manifest.get("weights", WEIGHTS)
    if "pickle" in manifest:
        loaded = _load_pickle(path / target, spec, trust_pickle)  # a relative pickle beside the manifest
        load_weights(loaded.module, weights, spec)
        return loaded
    return _load_factory(_beside(path, target), str(weights), spec, manifest.get("kwargs") or {})


def _beside(folder: Path, target: str) -> str:
    """``file.py:factory`` of a manifest in ``folder``, a relative file read from ``folder``; a module spec as is."""
    modname, _, attr = target.rpartition(":")
    return f"{folder / modname}:{attr}" if modname.endswith(".py") else target


def load_weights(module: nn.Module, path: Path, spec: str) -> None:
    """Load a state dict from safetensors (or a weights-only torch file) into ``module``, strictly."""
    from .data import read_tensors

    if not path.is_file():
        raise SpecError(f"{spec}: no weights file {path}")
    try:
        state = read_tensors(path)
    except Exception as exc:
        raise SpecError(f"{spec}: cannot read weights {path}: {one_line(exc)}") from None
    try:
        module.load_state_dict(state, strict=True)
    except (RuntimeError, TypeError, AttributeError) as exc:
        first = " ".join(str(exc).split())[:300]
        raise SpecError(f"{spec}: weights {path.name} do not fit the model: {first}") from None


# ---------------------------------------------------------------- Hugging Face


def _load_hf(path: Path, spec: str, seed: int) -> LoadedModel:
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    os.environ.setdefault("TRANSFORMERS_OFFLINE", "1")
    try:
        import transformers
    except ImportError:
        raise SpecError(f"{spec}: loading Hugging Face models needs transformers: pip install 'fxfuse[hf]'") from None
    from .checkpoint import CheckpointTensors

    try:
        config = transformers.AutoConfig.from_pretrained(str(path), local_files_only=True)
    except Exception as exc:
        raise SpecError(f"{spec}: cannot load Hugging Face model: {one_line(exc)}") from None
    arch, cls = hf_architecture(transformers, config, spec)
    cls = cls or transformers.AutoModel
    CheckpointTensors.from_dir(path)  # a truncated or corrupt header: one line naming the file
    try:
        if hasattr(config, "use_cache"):
            config.use_cache = False  # for tracing; an output keeps the input's config.json
        module, info = _quietly(lambda: cls.from_pretrained(str(path), config=config, local_files_only=True,
                                                            output_loading_info=True, ignore_mismatched_sizes=True,
                                                            **plain_torch_kwargs(transformers)))
    except Exception as exc:
        raise SpecError(f"{spec}: cannot load Hugging Face model: {type(exc).__name__}: {' '.join(str(exc).split())[:200]}") from None
    known = getattr(transformers, arch or "", None) is not None
    _check_loading_info(info, spec, type(module).__name__, arch, known=known)
    module.eval()
    return LoadedModel(module, (), hf_example_inputs(module, seed), spec, HF)


def hf_architecture(transformers, config, spec: str) -> tuple[str | None, type | None]:
    """``(architecture named by config.json, its transformers class or None)``; an architecture whose class
    takes another ``model_type`` than the config's is refused (its layers would read missing fields)."""
    arch = (getattr(config, "architectures", None) or [None])[0]
    cls = getattr(transformers, arch, None) if isinstance(arch, str) else None
    wanted = getattr(cls, "config_class", None)
    if isinstance(wanted, type) and not isinstance(config, wanted):
        has, takes = getattr(config, "model_type", None), getattr(wanted, "model_type", "?")
        raise SpecError(f"{spec}: config.json names the architecture {arch}, which does not fit its model_type "
                        f"'{has}' ({arch} takes '{takes}')")
    return arch, cls


def plain_torch_kwargs(transformers) -> dict:
    """``from_pretrained`` keywords that keep every layer's own torch forward.

    transformers ≥ 5 swaps layers for hub kernels when the ``kernels`` package
    is installed (``use_kernels`` defaults to on): their code is fetched at
    run time, their ops are not the graph fxfuse rules, and every later mode
    switch (``train()``) re-kernelizes the model, which fails on ``meta``
    weights. fxfuse asks for the plain model wherever the option exists.
    """
    return {"use_kernels": False} if hasattr(transformers.PreTrainedModel, "set_use_kernels") else {}


def _quietly(load: Callable):
    """``load()`` without transformers' load report: what it reports is refused below, in one line."""
    from transformers.utils import logging as hf_logging

    level = hf_logging.get_verbosity()
    hf_logging.set_verbosity_error()
    try:
        return load()
    finally:
        hf_logging.set_verbosity(level)


def _names(keys, limit: int = 4) -> str:
    keys = sorted(keys)
    return ", ".join(keys[:limit]) + (f" and {len(keys) - limit} more" if len(keys) > limit else "")


def _check_loading_info(info: Mapping[str, Any], spec: str, cls: str, arch: str | None, known: bool = True) -> None:
    """Refuse a checkpoint that does not fill the model exactly: transformers would draw missing or
    mis-shaped tensors at random, and drop tensors its class has no place for."""
    missing, unexpected = info.get("missing_keys") or (), info.get("unexpected_keys") or ()
    mismatched = info.get("mismatched_keys") or ()
    if missing:
        raise SpecError(f"{spec}: the checkpoint lacks {_names(missing)} ({cls} would fill them with random "
                        "values)")
    if mismatched:
        shown = ", ".join(f"{k} {tuple(a)} (the config gives {tuple(b)})" for k, a, b in sorted(mismatched)[:3])
        raise SpecError(f"{spec}: tensors of the checkpoint do not have the shapes of its config.json: {shown}")
    if unexpected:
        if arch is None:
            why = ("config.json names no 'architectures', so the bare base model was built; add the class with "
                   "the model's head")
        elif not known:
            why = (f"config.json names the architecture {arch}, which this transformers does not know, so the "
                   f"bare base model {cls} was built")
        else:
            why = f"{cls} has no place for them"
        raise SpecError(f"{spec}: the checkpoint's tensors {_names(unexpected)} would be lost ({why})")


def hf_example_inputs(module: nn.Module, seed: int = 0, batch: int = 2, seq: int = 16) -> dict[str, torch.Tensor]:
    """Example inputs for an HF model from its config: token ids (and decoder ids) or pixel values."""
    config = module.config
    name = getattr(module, "main_input_name", "input_ids")
    g = torch.Generator().manual_seed(seed)
    if name == "input_ids":
        vocab = getattr(config, "vocab_size", None)
        if not vocab:
            raise SpecError(f"{type(module).__name__}: config has no vocab_size to make example token ids")
        seq = min(seq, getattr(config, "max_position_embeddings", seq) or seq)
        ids = {name: torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=g)}
        if getattr(config, "is_encoder_decoder", False):  # the decoder reads token ids of its own
            ids["decoder_input_ids"] = torch.randint(min(3, vocab - 1), vocab, (batch, seq), generator=g)
        return ids
    if name == "pixel_values":
        size = getattr(config, "image_size", 32)
        size = size[0] if isinstance(size, (list, tuple)) else size
        channels = getattr(config, "num_channels", 3)
        return {name: torch.randn(batch, channels, size, size, generator=g)}
    raise SpecError(f"{type(module).__name__}: cannot make example inputs for '{name}'")


# ---------------------------------------------------------------- pickles


def _load_pickle(path: Path, spec: str, trust: bool) -> LoadedModel:
    if not trust:
        raise SpecError(f"{spec}: a pickle file can run arbitrary code when loaded; pass --trust-pickle if you trust it")
    try:
        module = torch.load(str(path), map_location="cpu", weights_only=False)
    except Exception as exc:
        raise SpecError(f"{spec}: cannot unpickle: {one_line(exc)}") from None
    if not isinstance(module, nn.Module):
        raise SpecError(f"{spec}: the pickle holds a {type(module).__name__}, not a module "
                        "(for a state dict use 'package.module:factory@weights')")
    example = getattr(module, "example_inputs", None)
    if not callable(example):
        raise SpecError(f"{spec}: the pickled module has no example_inputs() method")
    return LoadedModel(module.eval(), tuple(example()), {}, spec, PICKLE, str(path.resolve()))


# ---------------------------------------------------------------- saving


def check_output_path(out: str | Path, force: bool, directory: bool = False, owned: str | None = None) -> Path:
    """Refuse to overwrite an existing path unless ``force``; call before any work (``fxfuse.models.atomic``)."""
    return atomic.check_output_path(out, force, directory, owned)


def save_model(like: LoadedModel, module: nn.Module, out: str | Path, force: bool = False,
               extra: Mapping[str, str] | None = None) -> Path:
    """Write ``module`` as ``like`` was given (HF dir, or manifest + safetensors), atomically.

    ``extra`` maps file names to text written beside the model (e.g. a report).
    A Hugging Face output keeps the input's ``config.json`` byte for byte.
    """
    out = check_output_path(out, force, directory=True)
    tmp = atomic.temp_dir(out)
    try:
        if like.source == HF:
            module.save_pretrained(str(tmp), safe_serialization=True)
            shutil.copyfile(Path(like.spec) / "config.json", tmp / "config.json")
        else:
            save_state(module, tmp / WEIGHTS)
            (tmp / MANIFEST).write_text(json.dumps(_manifest(like, out), indent=2) + "\n")
        for name, text in (extra or {}).items():
            (tmp / name).write_text(text)
        atomic.replace(tmp, out)
    except BaseException as exc:
        atomic.discard(tmp)
        raise atomic.write_failure(out, exc) from None
    return out


def _manifest(like: LoadedModel, out: Path) -> dict:
    """How to rebuild the model class: its factory, or the pickle it came from, a file named relative to
    the output directory ``out`` (so that the two can move together; read back by ``_beside``)."""
    if like.source == PICKLE:
        return {"pickle": _relative(like.factory, out), "weights": WEIGHTS}
    factory = like.factory
    module, _, attr = factory.rpartition(":")
    if module.endswith(".py"):
        factory = f"{_relative(module, out)}:{attr}"
    return {"factory": factory, "kwargs": dict(like.factory_kwargs), "weights": WEIGHTS}


def _relative(file: str, out: Path) -> str:
    """``file`` relative to directory ``out`` (both resolved), or absolute where no relative path exists."""
    try:
        return os.path.relpath(Path(file).resolve(), Path(out).resolve())
    except ValueError:  # another drive
        return str(Path(file).resolve())


def save_state(module: nn.Module, path: Path) -> None:
    from safetensors.torch import save_file

    save_file({k: v.detach().contiguous().clone() for k, v in module.state_dict().items()}, str(path))


def write_text_atomic(path: str | Path, text: str, force: bool = False, owned: str | None = None) -> Path:
    path = check_output_path(path, force, owned=owned)
    fd, tmp = atomic.temp_file(path)
    try:
        with os.fdopen(fd, "w") as f:
            f.write(text)
        atomic.replace(tmp, path)
    except BaseException as exc:
        atomic.discard(tmp)
        raise atomic.write_failure(path, exc) from None
    return path
