"""Where the arithmetic runs: ``--device cpu|cuda|auto``.

``resolve(name)`` gives the ``torch.device`` of a device name: ``cpu``;
``cuda`` (the GPU of this process's local rank under ``torchrun`` or
``--workers``, else the current one; an error when torch sees none); ``auto``
(``cuda`` when torch sees a GPU, else ``cpu``). ``compute(name)`` is what the
stages take: ``None`` for the CPU, where they work in place as they always
have (the same operations, so the same bits), else the device to move their
operands to. What moves there: activation collection (the exported graphs and
their running sums), the similarity products of weight matching, Procrustes
SVDs and refinement. Assignments stay on the CPU (scipy); every result comes
back to the CPU, where maps are taken, checked and written.
"""
from __future__ import annotations

import os

import torch

from .errors import FxfuseError

DEVICES = ("cpu", "cuda", "auto")


class DeviceError(FxfuseError):
    """A device that cannot be used here; one line."""


def resolve(name: str) -> torch.device:
    """The device ``name`` (one of ``DEVICES``) stands for on this machine."""
    if name not in DEVICES:
        raise DeviceError(f"--device {name}: unknown device (one of {', '.join(DEVICES)})")
    if name == "cpu" or (name == "auto" and not torch.cuda.is_available()):
        return torch.device("cpu")
    if not torch.cuda.is_available():
        raise DeviceError("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); "
                          "use --device cpu, or auto to take a GPU only where there is one")
    local = os.environ.get("LOCAL_RANK")
    index = int(local) % torch.cuda.device_count() if local is not None and local.isdigit() else \
        torch.cuda.current_device()
    return torch.device("cuda", index)


def compute(name: str) -> torch.device | None:
    """``None`` where ``name`` resolves to the CPU (work in place), else the device to work on."""
    device = resolve(name)
    return None if device.type == "cpu" else device


def to(x: torch.Tensor, device: torch.device | None) -> torch.Tensor:
    """``x`` on ``device`` (itself where ``device`` is ``None``)."""
    return x if device is None else x.to(device, non_blocking=False)


def host(x: torch.Tensor) -> torch.Tensor:
    """``x`` on the CPU (itself if it is there)."""
    return x if x.device.type == "cpu" else x.cpu()
