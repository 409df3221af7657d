"""Data-parallel activation statistics over ``torch.distributed``.

Activation statistics are sums over samples (``Σx``, ``Σx²``, ``Σxyᵀ`` and a
count, see ``fxfuse.planner.activations``), so ``W`` workers can each run both models
on their share of the calibration batches (batch ``b`` goes to rank
``b mod W``) and one all-reduce (SUM) gives every worker the sums of all
batches: the same statistics as one process, up to the order of the float64
additions. Every rank runs the same command; rank 0 solves, checks and
writes, the others stop once the statistics are reduced.

* ``--workers N`` starts ``N − 1`` local worker processes beside this one
  (gloo backend, on 127.0.0.1);
* under ``torchrun`` (``RANK``, ``WORLD_SIZE``, ``MASTER_ADDR``, ``MASTER_PORT``
  set, on one machine or several) the same code joins torchrun's group.
"""
from __future__ import annotations

import datetime
import os
from contextlib import contextmanager
import socket
import subprocess
import sys
import tempfile
from typing import Any, Iterator, Mapping, Sequence

import torch

from ..core.errors import FxfuseError

TIMEOUT = datetime.timedelta(minutes=30)


class WorkerDone(Exception):
    """Raised on ranks other than 0 once their share of the statistics is reduced: they have nothing else to do."""


def world() -> tuple[int, int]:
    """``(rank, world size)`` of the initialised process group, ``(0, 1)`` without one."""
    import torch.distributed as dist

    if dist.is_available() and dist.is_initialized():
        return dist.get_rank(), dist.get_world_size()
    return 0, 1


def in_launched_group() -> bool:
    """Whether the environment describes a group of several processes (``torchrun``, or ``launch_local``'s workers)."""
    return int(os.environ.get("WORLD_SIZE", "1")) > 1


def init_from_env() -> bool:
    """Join the process group the environment describes (gloo); ``False`` when there is none (one process)."""
    import torch.distributed as dist

    if not in_launched_group():
        return False
    if not dist.is_initialized():
        dist.init_process_group("gloo", rank=int(os.environ["RANK"]), world_size=int(os.environ["WORLD_SIZE"]),
                                timeout=TIMEOUT)
    return True


def shard(batches: Sequence, rank: int, size: int) -> list:
    """Batches ``rank, rank + size, …``; every rank needs at least one (its statistics must have every key)."""
    if size > len(batches):
        raise FxfuseError(f"{size} workers for {len(batches)} calibration batches: need at least one batch per "
                          "worker (more calibration data, or fewer workers)")
    return list(batches[rank::size])


def all_reduce_sums(stats: Mapping[Any, Any]) -> None:
    """Sum every accumulator of ``stats`` (objects whose attributes are all sums: tensors and counts) over the group.

    Every rank must hold the same keys in the same order (the same jobs and at
    least one batch each); the tensors are summed in place.
    """
    import torch.distributed as dist

    for key in stats:
        acc = stats[key]
        for name in sorted(vars(acc)):
            value = getattr(acc, name)
            if isinstance(value, torch.Tensor):
                dist.all_reduce(value, op=dist.ReduceOp.SUM)
            elif isinstance(value, (int, float)) and not isinstance(value, bool):
                t = torch.tensor([value], dtype=torch.float64)
                dist.all_reduce(t, op=dist.ReduceOp.SUM)
                setattr(acc, name, type(value)(t.item()))


def _free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@contextmanager
def local_group(workers: int, argv: Sequence[str]) -> Iterator[list[subprocess.Popen]]:
    """Start ranks ``1 … workers − 1`` of ``fxfuse argv`` as local processes, with this process as rank 0.

    Yields the worker processes (wait for them with ``wait_workers``); on
    leaving, the group is destroyed and the environment restored. Workers run
    quietly (their messages would repeat rank 0's).
    """
    import torch.distributed as dist

    port = str(_free_port())
    group = {"MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port, "WORLD_SIZE": str(workers)}
    saved = {k: os.environ.get(k) for k in (*group, "RANK", "LOCAL_RANK")}
    child_argv = _without_workers(argv)
    procs = []
    try:
        for rank in range(1, workers):
            env = dict(os.environ, **group, RANK=str(rank), LOCAL_RANK=str(rank))  # LOCAL_RANK: its GPU
            procs.append(start_worker([sys.executable, "-m", "fxfuse.commands.cli", *child_argv, "--quiet"], env))
        os.environ.update(group, RANK="0", LOCAL_RANK="0")
        init_from_env()
        yield procs
    finally:
        for p in procs:
            if p.poll() is None:
                p.kill()
                p.wait()
        if dist.is_initialized():
            dist.destroy_process_group()
        for k, v in saved.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


def start_worker(command: Sequence[str], env: dict) -> subprocess.Popen:
    """Start one worker process; its stderr goes to a temporary file (``error_log``) read when it fails."""
    log = tempfile.TemporaryFile()
    proc = subprocess.Popen(list(command), env=env, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=log)
    proc.error_log = log
    return proc


def _without_workers(argv: Sequence[str]) -> list[str]:
    out, skip = [], False
    for a in argv:
        if skip:
            skip = False
        elif a == "--workers":
            skip = True
        elif not a.startswith("--workers="):
            out.append(a)
    return out


def wait_workers(procs: Sequence[subprocess.Popen], ok: bool) -> str | None:
    """Wait for the workers (ended at once if rank 0 failed); the first failing worker's last error line, if any."""
    failure = None
    for rank, p in enumerate(procs, start=1):
        if not ok:
            p.kill()
        p.wait()
        if ok and p.returncode != 0 and failure is None:
            p.error_log.seek(0)
            lines = [line for line in p.error_log.read().decode(errors="replace").splitlines() if line.strip()]
            failure = f"worker {rank} failed (exit {p.returncode}): {lines[-1] if lines else 'no message'}"
    return failure
