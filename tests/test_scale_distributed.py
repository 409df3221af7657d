"""Activation statistics collected by two local workers (torch.distributed, gloo) equal one process's."""
from __future__ import annotations

import json
import os

import numpy as np
import torch
import torch.multiprocessing as mp

import fxfuse
import zoo
from fxfuse.planner.activations import activation_cost
from fxfuse.commands.cli import main
from fxfuse.models.distributed import _free_port, all_reduce_sums, shard
from fxfuse.api.fuse import calibration_batches

MODEL, SAMPLES = "mha", 64  # heads nested in the residual stream; 4 batches of 16


def _cost(batches, reduce=None):
    a, _ = zoo.ZOO[MODEL](seed=0)
    b, _ = zoo.ZOO[MODEL](seed=1)
    args = batches[0][0]  # traced at the calibration batch shape, as fxfuse.compile does
    ta, tb = fxfuse.analyze(a, args), fxfuse.analyze(b, args)
    return activation_cost(ta, tb, batches, reduce=reduce)


def _batches():
    _, args = zoo.ZOO[MODEL](seed=0)
    return calibration_batches(SAMPLES, args, {}, seed=0)


def _worker(rank: int, size: int, port: int, out: str) -> None:
    import torch.distributed as dist

    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=size)
    try:
        cost = _cost(shard(_batches(), rank, size), reduce=all_reduce_sums)
        if rank == 0:
            torch.save({"stats": cost.stats, "nested": cost.nested_stats}, out)
        dist.barrier()  # both ranks done before either tears gloo down (a rank leaving early may abort the other)
    finally:
        dist.destroy_process_group()


def test_two_workers_give_the_single_process_statistics(tmp_path):
    out = str(tmp_path / "stats.pt")
    mp.spawn(_worker, args=(2, _free_port(), out), nprocs=2, join=True)
    got = torch.load(out, weights_only=False)
    batches = _batches()
    assert len(batches) == 4
    single = _cost(batches)
    assert got["stats"].keys() == single.stats.keys() and single.stats
    assert got["nested"].keys() == single.nested_stats.keys()
    for k, v in single.stats.items():  # equal up to the order of the float64 additions
        np.testing.assert_allclose(got["stats"][k], v, rtol=1e-10, atol=1e-12)
    for k, v in single.nested_stats.items():
        np.testing.assert_allclose(got["nested"][k], v, rtol=1e-10, atol=1e-12)
    half = _cost(batches[::2])  # one worker's share alone is not the same thing
    assert any(not np.allclose(half.stats[k], v, atol=1e-6) for k, v in single.stats.items())


def _mha_pair_fused_once(tmp_path, monkeypatch) -> tuple[str, str, list[str]]:
    """Two zoo MHA models as file specs that worker processes can import (the zoo on their PYTHONPATH), fused
    once by activations in this process into ``tmp_path / "one"``; ``(spec a, spec b, the common flags)``."""
    tests = os.path.dirname(os.path.abspath(__file__))
    monkeypatch.setenv("PYTHONPATH", os.pathsep.join(filter(None, [tests, os.environ.get("PYTHONPATH")])))
    models = tmp_path / "models.py"
    models.write_text("import zoo\n\ndef a():\n    return zoo.mha(seed=0)\n\n"
                      "def b():\n    return zoo.mha(seed=1)\n")
    a, b = f"{models}:a", f"{models}:b"
    common = ["--cost", "activations", "--calib-random", "64", "-q"]
    assert main(["compile", a, b, "-o", str(tmp_path / "one"), *common]) == 0
    return a, b, common


def test_workers_on_the_command_line_write_what_one_process_writes(tmp_path, capsys, monkeypatch):
    from fxfuse.backend.lazy import CheckpointTensors

    a, b, common = _mha_pair_fused_once(tmp_path, monkeypatch)
    assert main(["compile", a, b, "-o", str(tmp_path / "two"), "--workers", "2", *common]) == 0
    one, two = CheckpointTensors.from_dir(tmp_path / "one"), CheckpointTensors.from_dir(tmp_path / "two")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    moved = [m["units_moved"] for s in r1["spaces"] for m in s["models"]]
    assert any(moved)
    assert moved == [m["units_moved"] for s in r2["spaces"] for m in s["models"]]
    assert "WORLD_SIZE" not in os.environ  # the group is left behind cleanly


def test_workers_need_a_batch_each_and_activations(tmp_path, capsys):
    spec = "zoo:mlp"
    code = main(["compile", spec, spec, "-o", str(tmp_path / "o"), "--workers", "2", "-q"])
    assert code == 2 and "--cost activations" in capsys.readouterr().err
    code = main(["compile", spec, spec, "-o", str(tmp_path / "o"), "--workers", "3", "--cost", "activations",
                 "--calib-random", "32", "-q"])
    assert code == 2
    err = capsys.readouterr().err
    assert "3 workers for 2 calibration batches" in err, err
    assert not (tmp_path / "o").exists()


def test_a_failing_worker_is_named_with_its_last_error_line():
    import sys

    from fxfuse.models.distributed import start_worker, wait_workers

    script = "import sys; sys.stderr.write('Traceback ...\\nValueError: worker broke\\n'); sys.exit(3)"
    broken = start_worker([sys.executable, "-c", script], dict(os.environ))
    fine = start_worker([sys.executable, "-c", "pass"], dict(os.environ))
    assert wait_workers([fine, broken], ok=True) == "worker 2 failed (exit 3): ValueError: worker broke"
    assert wait_workers([start_worker([sys.executable, "-c", "pass"], dict(os.environ))], ok=True) is None


def test_torchrun_over_two_nodes_writes_what_one_process_writes(tmp_path, capsys, monkeypatch):
    """Two ``torchrun`` node ranks (``--nnodes 2 --node-rank 0|1``, one process each, static rendezvous), here on
    one host as on two machines: node 0's process is rank 0 and writes; node 1's reduces its share and exits 0."""
    import subprocess
    import sys
    from pathlib import Path

    from fxfuse.backend.lazy import CheckpointTensors

    torchrun = Path(sys.executable).with_name("torchrun")
    a, b, common = _mha_pair_fused_once(tmp_path, monkeypatch)
    port = str(_free_port())
    env = dict(os.environ, OMP_NUM_THREADS="1")
    for k in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR", "MASTER_PORT"):
        env.pop(k, None)
    nodes = [subprocess.Popen([str(torchrun), "--nnodes", "2", "--nproc-per-node", "1", "--node-rank", str(node),
                               "--master-addr", "127.0.0.1", "--master-port", port, "-m", "fxfuse.commands.cli", "compile",
                               a, b, "-o", str(tmp_path / "two"), *common],
                              env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for node in (0, 1)]
    done = [p.communicate(timeout=600) for p in nodes]
    assert [p.returncode for p in nodes] == [0, 0], [err[-2000:] for _, err in done]
    one, two = CheckpointTensors.from_dir(tmp_path / "one"), CheckpointTensors.from_dir(tmp_path / "two")
    assert set(one) == set(two) and all(torch.equal(one[k], two[k]) for k in one)
    r1, r2 = (json.loads((tmp_path / d / "report.json").read_text()) for d in ("one", "two"))
    moved = [m["units_moved"] for s in r1["spaces"] for m in s["models"]]
    assert any(moved) and moved == [m["units_moved"] for s in r2["spaces"] for m in s["models"]]
    assert done[1][0] == "" and done[0][0].startswith(f"wrote {tmp_path / 'two'} ")  # only node 0 writes
