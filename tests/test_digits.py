"""The ``digits`` data split, models and the shipped example model directories.

Fast: no full training. The shipped directories are read directly (safetensors
+ the factory named in ``fxfuse.json``), independent of ``fxfuse.models.io``.
"""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

pytest.importorskip("sklearn")

from safetensors.torch import load_file  # noqa: E402

import digits  # noqa: E402

EXAMPLES = Path(__file__).resolve().parent.parent / "examples"
SHIPPED = {
    "digits-mlp-a": ("../digits.py:mlp", digits.DigitsMLP),
    "digits-mlp-b": ("../digits.py:mlp", digits.DigitsMLP),
    "digits-vit-a": ("../digits.py:vit", digits.DigitsViT),
    "digits-vit-b": ("../digits.py:vit", digits.DigitsViT),
}


@pytest.fixture(scope="module")
def split():
    return digits.load_split()


def _resolve(folder: Path, spec: str):
    """The factory that a manifest in ``folder`` names as ``file.py:name``, the file relative to ``folder``."""
    file, _, name = spec.rpartition(":")
    assert (folder / file).resolve() == Path(digits.__file__).resolve()
    return getattr(digits, name)


# ---------------------------------------------------------------- data


def test_load_split_shapes_and_dtypes(split):
    x_tr, y_tr, x_te, y_te = split
    assert x_tr.shape == (1397, 1, 8, 8) and x_te.shape == (400, 1, 8, 8)
    assert y_tr.shape == (1397,) and y_te.shape == (400,)
    assert x_tr.dtype == x_te.dtype == torch.float32
    assert y_tr.dtype == y_te.dtype == torch.int64
    for x in (x_tr, x_te):
        assert x.min() >= 0 and x.max() <= 1 and x.max() == 1
    assert set(y_tr.tolist()) == set(y_te.tolist()) == set(range(10))
    counts = torch.bincount(y_te, minlength=10)
    assert counts.min() >= 39 and counts.max() <= 41            # stratified: ~40 of each class


def test_load_split_is_deterministic_and_fresh(split):
    again = digits.load_split()
    for a, b in zip(split, again):
        assert torch.equal(a, b)
        assert a.data_ptr() != b.data_ptr()                     # callers may modify their copy
    assert torch.equal(digits.load_split(seed=0)[3], split[3])
    assert not torch.equal(digits.load_split(seed=1)[3], split[3])


# ---------------------------------------------------------------- models


@pytest.mark.parametrize("factory", [digits.mlp, digits.vit])
def test_factory_contract(factory, split):
    model, args = factory()
    assert not model.training
    assert isinstance(args, tuple) and len(args) == 1
    # example inputs are deterministic images in [0, 1] of the data's shape, made without scikit-learn
    assert args[0].shape == split[2][:16].shape and args[0].dtype == split[2].dtype
    assert torch.equal(args[0], factory()[1][0]) and 0 <= float(args[0].min()) and float(args[0].max()) <= 1
    assert model(*args).shape == (16, 10)
    same, _ = factory(seed=0)
    other, _ = factory(seed=1)
    sd, sd_same, sd_other = model.state_dict(), same.state_dict(), other.state_dict()
    assert all(torch.equal(sd[k], sd_same[k]) for k in sd)
    assert any(not torch.equal(sd[k], sd_other[k]) for k in sd)


def test_factory_kwargs():
    m, _ = digits.mlp(seed=3, h1=32, h2=16)
    assert [tuple(p.shape) for p in m.parameters()] == [(32, 64), (32,), (16, 32), (16,), (10, 16), (10,)]
    v, _ = digits.vit(seed=3, dim=32, heads=2, mlp=48, depth=3)
    assert [k for k in v.state_dict() if k.endswith("mlp.0.weight")] == [f"blocks.{i}.mlp.0.weight" for i in range(3)]
    assert v.state_dict()["blocks.2.mlp.0.weight"].shape == (48, 32)
    assert v.blocks[0].attn.num_heads == 2


@pytest.mark.parametrize("factory", [digits.mlp, digits.vit])
def test_exports(factory):
    model, args = factory(seed=1)
    ep = torch.export.export(model.eval(), args)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(*args), model(*args), rtol=1e-5, atol=1e-5)


def test_train_is_deterministic(split):
    x_tr, y_tr = split[0][:96], split[1][:96]
    runs = []
    for _ in range(2):
        model, _ = digits.mlp(seed=5, h1=16, h2=8)
        runs.append(digits.train(model, 2, seed=7, lr=1e-2, batch_size=32, data=(x_tr, y_tr)))
    assert not runs[0].training
    a, b = runs[0].state_dict(), runs[1].state_dict()
    assert all(torch.equal(a[k], b[k]) for k in a)
    assert not torch.equal(a["fc1.weight"], digits.mlp(seed=5, h1=16, h2=8)[0].state_dict()["fc1.weight"])
    acc = digits.accuracy(runs[0], split[2], split[3])
    assert 0.0 <= acc <= 1.0


# ---------------------------------------------------------------- shipped example directories


@pytest.mark.parametrize("name", sorted(SHIPPED))
def test_shipped_example(name, split):
    folder = EXAMPLES / name
    assert folder.is_dir(), f"{folder} missing: run examples/train_digits.py"
    meta = json.loads((folder / "fxfuse.json").read_text())
    factory_spec, cls = SHIPPED[name]
    assert meta["factory"] == factory_spec
    assert meta["weights"] == "model.safetensors"
    assert isinstance(meta["kwargs"], dict)
    weights = folder / meta["weights"]
    assert sum(f.stat().st_size for f in folder.iterdir()) < 512 * 1024

    factory = _resolve(folder, meta["factory"])
    model, args = factory(seed=0, **meta["kwargs"])
    assert isinstance(model, cls)
    state = load_file(str(weights))
    assert all(v.dtype == torch.float32 for v in state.values())
    model.load_state_dict(state, strict=True)
    model.eval()
    assert digits.accuracy(model, split[2], split[3]) >= 0.9


def test_shipped_pairs_differ():
    for kind in ("mlp", "vit"):
        a = load_file(str(EXAMPLES / f"digits-{kind}-a" / "model.safetensors"))
        b = load_file(str(EXAMPLES / f"digits-{kind}-b" / "model.safetensors"))
        assert a.keys() == b.keys()
        assert all(a[k].shape == b[k].shape for k in a)
        assert any(not torch.equal(a[k], b[k]) for k in a)
