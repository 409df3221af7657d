"""Loss barriers: zero on a model with itself and on a permuted copy after alignment; clear errors on bad data."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fxfuse
import zoo
from fxfuse.api.barrier import Curve, check_data, detect_head
from fxfuse.commands.cli import main
from fxfuse.core.errors import FxfuseError


EXAMPLES = Path(__file__).resolve().parent.parent / "examples"


@pytest.fixture(scope="module")
def mlp_case():
    """The shipped digits MLP (trained) and the real digits test set."""
    from fxfuse.models.data import load_labelled
    from fxfuse.models.io import load_model

    loaded = load_model(str(EXAMPLES / "digits-mlp-a"))
    x, y = load_labelled(EXAMPLES / "digits-test.safetensors")
    return loaded.module, loaded.args, x[:128], y[:128]


def test_curve_barrier_is_excess_over_the_chord():
    c = Curve((0.0, 0.5, 1.0), (1.0, 3.0, 2.0))
    assert c.barrier == pytest.approx(3.0 - 1.5)
    flat = Curve((0.0, 0.5, 1.0), (1.0, 1.5, 2.0))
    assert flat.barrier == pytest.approx(0.0)


def test_model_with_itself_has_zero_barrier_at_every_point(mlp_case):
    model, args, x, y = mlp_case
    r = fxfuse.barrier(model, model, x, y, args, points=5)
    for c in (r.vanilla, r.aligned):
        assert len(c.loss) == 5
        assert max(c.loss) - min(c.loss) < 1e-6
        assert abs(c.barrier) < 1e-6


@pytest.mark.parametrize("cost", ["weights", "activations"])
def test_permuted_copy_barrier_zero_after_alignment_positive_before(mlp_case, cost):
    model, args, x, y = mlp_case
    permuted = fxfuse.permute(model, args, seed=3)
    r = fxfuse.barrier(model, permuted, x, y, args, points=5, cost=cost, calib=32)
    assert r.vanilla.loss[0] == pytest.approx(r.aligned.loss[0])
    assert r.vanilla.loss[-1] == pytest.approx(r.aligned.loss[-1], abs=1e-5)
    assert abs(r.aligned.barrier) < 1e-5, r.aligned.loss
    assert r.vanilla.barrier > 0.1, r.vanilla.loss


def test_language_model_heads_on_gpt2_and_bert_mlm():
    for factory, head in ((zoo.gpt2, "causal"), (zoo.bert_mlm, "mlm")):
        model, args = factory(seed=0)
        assert detect_head(model) == head
        ids = torch.randint(3, zoo.VOCAB, (6, zoo.SEQ), generator=torch.Generator().manual_seed(1))
        labels = ids.clone() if head == "causal" else torch.where(torch.rand(ids.shape) < 0.3, ids, -100)
        labels[0, 0] = labels[0, 0] if head == "causal" else ids[0, 0]  # at least one labelled token
        permuted = fxfuse.permute(model, args, seed=2)
        r = fxfuse.barrier(model, permuted, ids, labels, args, points=3)
        assert r.head == head
        # aligned: the same function at every λ; vanilla: the midpoint is another model
        assert max(r.aligned.loss) - min(r.aligned.loss) < 1e-4, r.aligned.loss
        assert abs(r.vanilla.loss[1] - r.vanilla.loss[0]) > 1e-3, r.vanilla.loss


@pytest.mark.parametrize("inputs, labels, message", [
    (torch.randn(0, 1, 8, 8), torch.zeros(0, dtype=torch.long), "empty"),
    (torch.randn(8, 1, 8, 4), torch.zeros(8, dtype=torch.long), "inputs have shape (8, 1, 8, 4)"),
    (torch.randint(0, 5, (8, 1, 8, 8)), torch.zeros(8, dtype=torch.long), "dtype"),
    (torch.randn(8, 1, 8, 8), torch.zeros(8), "labels must be integer"),
    (torch.randn(8, 1, 8, 8), torch.zeros(7, dtype=torch.long), "8 inputs but 7 labels"),
    (torch.randn(8, 1, 8, 8), torch.zeros(8, 3, dtype=torch.long), "classification head takes (N,)"),
])
def test_bad_data_fails_with_a_clear_message(mlp_case, inputs, labels, message):
    model, args, _, _ = mlp_case
    with pytest.raises(FxfuseError, match=None) as err:
        fxfuse.barrier(model, model, inputs, labels, args, points=3)
    assert message in str(err.value)
    assert "\n" not in str(err.value)


def test_check_data_accepts_other_sequence_lengths_for_language_models():
    example = torch.zeros(2, 8, dtype=torch.long)
    check_data(torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, 16, dtype=torch.long), example, "mlm")
    with pytest.raises(FxfuseError, match="takes \\(N, S\\)"):
        check_data(torch.zeros(4, 16, dtype=torch.long), torch.zeros(4, dtype=torch.long), example, "causal")


def test_cli_barrier_json_and_plot(tmp_path, capsys, mlp_case):
    model, args, x, y = mlp_case
    permuted = fxfuse.permute(model, args, seed=1)
    torch.save(permuted.state_dict(), tmp_path / "b.pt")
    torch.save({"inputs": x, "labels": y}, tmp_path / "data.pt")
    png = tmp_path / "curve.png"
    a = str(EXAMPLES / "digits-mlp-a")
    b = f"{EXAMPLES / 'digits.py'}:mlp@{tmp_path / 'b.pt'}"  # the file that a's manifest names: one class
    rc = main(["barrier", a, b, "--data", str(tmp_path / "data.pt"),
               "--points", "5", "--json", "--plot", str(png), "-q"])
    assert rc == 0
    out = json.loads(capsys.readouterr().out)
    assert out["vanilla"]["barrier"] > 0.1
    assert abs(out["aligned"]["barrier"]) < 1e-5
    assert len(out["lambdas"]) == 5
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    # an existing plot is not overwritten without --force, and nothing else is written
    before = png.read_bytes()
    rc = main(["barrier", a, a, "--data", str(tmp_path / "data.pt"), "--plot", str(png), "-q"])
    assert rc == 2 and "already exists" in capsys.readouterr().err
    assert png.read_bytes() == before


def test_cli_barrier_bad_data_file(tmp_path, capsys):
    torch.save({"inputs": torch.randn(4, 64)}, tmp_path / "nolabels.pt")
    rc = main(["barrier", "zoo:mlp", "zoo:mlp", "--data", str(tmp_path / "nolabels.pt"), "-q"])
    err = capsys.readouterr().err
    assert rc == 2 and "no labels tensor" in err and err.count("\n") == 1
