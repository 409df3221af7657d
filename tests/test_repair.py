"""Statistics repair: a no-op on self-fusion, exact recovery kept, collapsed statistics restored, BatchNorm reset."""
from __future__ import annotations

import pytest
import torch

import fxfuse
import digits
import zoo
from fxfuse.commands.cli import main
from fxfuse.api.fuse import FusionError, calibration_batches
from fxfuse.backend.repair import RepairError, repair, repair_points, repair_state, run_graph, trace_for, unit_stats
from fxfuse.frontend.verify import compare_outputs

pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def _calib(n: int = 64, seed: int = 0) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def test_points_are_the_producers_before_nonlinearities_and_norms():
    model, args = digits.vit(seed=1)
    points = {p.weight for p in repair_points(trace_for(model, calibration_batches(_calib(), args, {})))}
    assert "blocks.0.mlp.0.weight" in points          # -> GELU
    assert "blocks.1.mlp.2.weight" in points          # -> residual add -> final LayerNorm
    assert "blocks.0.ln1.weight" in points            # the norm's own affine
    assert "blocks.0.attn.in_proj_weight" not in points  # q, k, v only meet attention
    assert "head.weight" not in points                # the logits pass no nonlinearity
    gpt2, ids = zoo.gpt2(seed=0)
    points = {p.weight: p.weight_dim for p in repair_points(trace_for(gpt2, [(ids, {})]))}
    assert points["transformer.h.0.mlp.c_fc.weight"] == 1  # Conv1D (in, out) -> a GELU written out with tanh
    assert "transformer.h.0.attn.c_attn.weight" not in points
    assert "transformer.wte.weight" not in points          # tied with the LM head


def test_points_that_write_a_normalised_residual_stream_are_marked():
    model, args = digits.vit(seed=1)
    points = {p.weight: p.writes_stream for p in repair_points(trace_for(model, calibration_batches(_calib(), args, {})))
              if p.weight is not None}
    assert points["blocks.0.attn.out_proj.weight"] and points["blocks.1.mlp.2.weight"]  # -> add -> LayerNorm
    assert points["patch.weight"]                      # the stream's first writer (-> + pos -> LayerNorm)
    assert not points["blocks.0.mlp.0.weight"]         # -> GELU
    assert not points["blocks.0.ln1.weight"]           # a norm, not a writer
    cnn, cnn_args = zoo.cnn(seed=0)
    traced = trace_for(cnn, [(cnn_args, {})])
    assert not any(p.writes_stream for p in repair_points(traced))  # convolutions -> batch norm / ReLU


def test_repair_of_a_model_fused_with_itself_changes_nothing():
    model, args = digits.vit(seed=1)
    result = fxfuse.compile([model, model], args, repair=True, calib=_calib())
    assert result.report["repair"]["points"]
    for key, value in model.state_dict().items():
        assert torch.allclose(result.module.state_dict()[key], value, atol=1e-6, rtol=0), key


def test_repair_keeps_the_exact_recovery_of_a_permuted_copy():
    model, args = digits.vit(seed=1)
    permuted = fxfuse.permute(model, args, seed=5)
    result = fxfuse.compile([model, permuted], args, repair=True, calib=_calib())
    assert compare_outputs(model, result.module, args) < 1e-4
    assert type(result.module) is type(model)
    assert set(result.module.state_dict()) == set(model.state_dict())


def test_repair_restores_the_collapsed_statistics_of_an_average():
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    batches = calibration_batches(_calib(128), args, {})
    vanilla = fxfuse.compile([a, b], args, method="vanilla").module
    traced = trace_for(a, batches)
    points = [p for p in repair_points(traced) if p.weight is not None]

    def interpolated() -> dict:
        sa = unit_stats(traced, a.state_dict(), batches, points)
        sb = unit_stats(traced, b.state_dict(), batches, points)
        return {k: (0.5 * sa[k][0] + 0.5 * sb[k][0], 0.5 * sa[k][1] + 0.5 * sb[k][1]) for k in sa}

    want = interpolated()
    before = unit_stats(traced, vanilla.state_dict(), batches, points)
    collapse = [float((before[k][1] / want[k][1]).mean()) for k in want]
    assert min(collapse) < 0.9, collapse  # averaging unrelated units shrinks their spread
    repaired, report = repair(vanilla, [a, b], [0.5, 0.5], batches)
    after = unit_stats(traced, repaired.state_dict(), batches, points)
    for k, (mu, sd) in want.items():
        torch.testing.assert_close(after[k][1], sd, rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(after[k][0], mu, rtol=1e-4, atol=1e-5)
    # statistics of fresh inputs move the same way (not only the calibration batches)
    fresh = calibration_batches(_calib(128, seed=1), args, {})
    held = unit_stats(traced, repaired.state_dict(), fresh, points)
    ratios = [float((held[k][1] / want[k][1]).mean()) for k in want]
    assert all(0.9 < r < 1.1 for r in ratios), ratios
    assert type(repaired) is type(a) and set(repaired.state_dict()) == set(a.state_dict())


def test_repair_at_an_interpolation_point_uses_its_weights():
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    batches = calibration_batches(_calib(), args, {})
    traced = trace_for(a, batches)
    sa, sb = a.state_dict(), b.state_dict()
    mixed = {k: 0.8 * sa[k] + 0.2 * sb[k] for k in sa}
    fixed = repair_state(traced, mixed, [sa, sb], [0.8, 0.2], batches).state
    points = [p for p in repair_points(traced) if p.weight is not None]
    st_a, st_b = unit_stats(traced, sa, batches, points), unit_stats(traced, sb, batches, points)
    got = unit_stats(traced, fixed, batches, points)
    for k in got:
        torch.testing.assert_close(got[k][1], 0.8 * st_a[k][1] + 0.2 * st_b[k][1], rtol=1e-4, atol=1e-6)
    # at an end point the repair is the identity
    same = repair_state(traced, sa, [sa, sb], [1.0, 0.0], batches).state
    assert all(torch.allclose(same[k], sa[k], atol=1e-6) for k in sa)


def test_batch_norm_running_statistics_are_reset_on_the_calibration_data():
    a, args = zoo.cnn(seed=0)
    b, _ = zoo.cnn(seed=1)
    calib = torch.randn((32,) + tuple(args[0].shape[1:]), generator=torch.Generator().manual_seed(0))
    result = fxfuse.compile([a, b], args, repair=True, calib=calib)
    batches = calibration_batches(calib, args, {})
    traced = trace_for(result.module, batches)
    norms = [p for p in repair_points(traced) if p.running is not None]
    assert norms and all(e["reset_running_stats"] for e in result.report["repair"]["points"]
                         if "batch_norm" in e["op"])
    nodes = {n.name: n for n in traced.graph.nodes}
    state = result.module.state_dict()
    for p in norms:
        src = nodes[p.node].args[0].name
        n = state[p.running[0]].numel()
        xs = torch.cat([run_graph(traced, state, args_, kw, {src})[src].movedim(1, -1).reshape(-1, n)
                        for args_, kw in batches]).double()
        torch.testing.assert_close(state[p.running[0]].double(), xs.mean(0), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(state[p.running[1]].double(), xs.var(0), rtol=1e-3, atol=1e-5)


def test_repair_without_calibration_inputs_is_a_clear_error(tmp_path, capsys):
    model, args = digits.vit(seed=1)
    with pytest.raises(FusionError, match="--repair needs calibration inputs"):
        fxfuse.compile([model, model], args, repair=True)
    with pytest.raises(RepairError, match="calibration inputs"):
        repair(model, [model, model], [0.5, 0.5], [])
    spec = "digits:vit"
    out = tmp_path / "fused"
    assert main(["compile", spec, spec, "-o", str(out), "--repair", "-q"]) == 2
    assert "--repair needs calibration inputs" in capsys.readouterr().err
    assert not out.exists()


def test_cli_compile_and_barrier_with_repair(tmp_path, capsys):
    spec = "digits:vit"
    out = tmp_path / "fused"
    assert main(["compile", spec, spec, "-o", str(out), "--repair", "--calib-random", "32", "-q"]) == 0
    import json

    capsys.readouterr()
    report = json.loads((out / "report.json").read_text())
    assert report["repair"]["points"]
    x, y = digits.load_split()[2:]
    data = tmp_path / "data.pt"
    torch.save({"inputs": x[:64], "labels": y[:64]}, data)
    assert main(["barrier", spec, "digits:vit", "--data", str(data), "--points", "3", "--repair",
                 "--calib-random", "32", "--json", "-q"]) == 0
    curves = json.loads(capsys.readouterr().out)
    assert curves["aligned"]["barrier"] == pytest.approx(0.0, abs=1e-5)


def test_repair_composes_with_three_models_and_with_widths():
    a, args = digits.mlp(seed=1, h1=32, h2=16)
    b, _ = digits.mlp(seed=2, h1=32, h2=16)
    c, _ = digits.mlp(seed=3, h1=32, h2=16)
    wide, _ = digits.mlp(seed=4, h1=64, h2=16)
    calib = _calib(64)
    batches = calibration_batches(calib, args, {})
    for models, weights in (([a, b, c], [0.5, 0.3, 0.2]), ([a, wide], [0.5, 0.5])):
        result = fxfuse.compile(models, args, repair=True, calib=calib, weights=weights)
        traced = trace_for(result.module, batches)
        points = [p for p in repair_points(traced) if p.weight is not None]
        assert {p.weight for p in points} == {"fc1.weight", "fc2.weight"}
        stats = [unit_stats(traced, m.state_dict(), batches, points) for m in result.aligned]
        got = unit_stats(traced, result.module.state_dict(), batches, points)
        for k in got:
            want = sum(w * s[k][1] for w, s in zip(weights, stats))
            torch.testing.assert_close(got[k][1], want, rtol=1e-4, atol=1e-6)
