"""Tensors that modules derive from their weights and keep outside the state dict.

Some modules compute a tensor from their parameters on first use in eval mode
and keep it in a plain attribute, dropping it when put in training mode
(LeViT's ``attention_bias_cache``: the bias table gathered by its index buffer,
``(heads, T, T)``). The state dict does not carry it, ``copy.deepcopy`` keeps
it and ``load_state_dict`` does not refresh it: a copy given moved or averaged
weights would compute with the tensor of the weights it was copied from, and
``torch.export`` of a module that has run would read the tensor as a constant
instead of the parameter.

``forget_derived`` drops such tensors the way their modules do; fxfuse calls it
before tracing or copying a module and whenever it loads weights into one, so
every module it traces, checks or returns computes what its own weights say.
"""
from __future__ import annotations

import copy
from typing import Mapping

import torch
from torch import nn


def forget_derived(module: nn.Module) -> nn.Module:
    """Every submodule enters training mode (where such modules drop their caches) and returns to its own
    mode (per submodule, as it was); returns ``module``."""
    modes = [(m, m.training) for m in module.modules()]
    module.train(True)
    for m, mode in modes:
        m.training = mode
    return module


def loaded_copy(module: nn.Module, state: Mapping[str, torch.Tensor]) -> nn.Module:
    """A deep copy of ``module`` holding ``state`` (``load_state_dict(strict=True)``), nothing derived kept."""
    clone = copy.deepcopy(forget_derived(module))
    clone.load_state_dict(dict(state), strict=True)
    return forget_derived(clone)
