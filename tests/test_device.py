"""``--device``: where the arithmetic runs. CPU by default; ``auto`` takes a GPU only where torch sees one;
``cuda`` without one is a one-line error. The path that moves operands to a device and back is run here
with the CPU as that device: every mode gives the same maps, and the same weights within float rounding."""
from __future__ import annotations

import pytest
import torch
import yaml

import fxfuse
import fxfuse.passes.inputs as inputs_pass
import zoo
from clirun import refused
from fxfuse.core.device import DeviceError, compute, resolve
from fxfuse.recipes.recipe import Recipe, RecipeError
from fxfuse.backend.refine import RefineConfig

pytestmark = pytest.mark.usefixtures("quiet_one_thread")
GPU = torch.cuda.is_available()


def test_names_resolve_to_devices():
    assert resolve("cpu") == torch.device("cpu") and compute("cpu") is None
    assert resolve("auto").type == ("cuda" if GPU else "cpu")
    assert (compute("auto") is None) is (not GPU)
    if GPU:
        assert resolve("cuda").type == "cuda"
    else:
        with pytest.raises(DeviceError, match=r"^--device cuda: torch sees no CUDA device here"):
            resolve("cuda")
    with pytest.raises(DeviceError, match="unknown device"):
        resolve("tpu")


def test_the_recipe_key_is_validated_and_saved(tmp_path):
    assert Recipe().device == "cpu"
    assert yaml.safe_load(Recipe(device="auto").to_yaml())["device"] == "auto"
    bad = tmp_path / "r.yaml"
    bad.write_text("models: [a, b]\ndevice: gpu\n")
    with pytest.raises(RecipeError, match=r"r.yaml: key 'device': 'gpu' is not one of cpu, cuda, auto"):
        Recipe.load(bad)


def test_cuda_without_a_gpu_fails_in_one_line_before_loading(tmp_path, capsys):
    """Where torch sees a GPU the flag is taken (``test_names_resolve_to_devices``); here it is refused."""
    a, args = zoo.mlp(seed=0)
    if GPU:
        assert fxfuse.compile([a, zoo.mlp(seed=1)[0]], args, device="cuda").report["self_check"]
        return
    line = refused(capsys, tmp_path, "compile", "no-such-model-a", "no-such-model-b", "-o", tmp_path / "out",
                   "--device", "cuda")
    assert line == ("--device cuda: torch sees no CUDA device here (torch.cuda.is_available() is False); use "
                    "--device cpu, or auto to take a GPU only where there is one")
    with pytest.raises(DeviceError, match="^--device cuda: torch sees no CUDA device"):
        fxfuse.compile([a, zoo.mlp(seed=1)[0]], args, device="cuda")


def test_auto_on_this_machine_is_the_default_bit_for_bit():
    a, args = zoo.bert(seed=0)
    b, _ = zoo.bert(seed=1)
    kw = {"example_kwargs": args} if isinstance(args, dict) else {}
    args = () if isinstance(args, dict) else args
    first = fxfuse.compile([a, b], args, **kw)
    auto = fxfuse.compile([a, b], args, device="auto" if not GPU else "cpu", **kw)
    for key, value in first.module.state_dict().items():
        assert torch.equal(value, auto.module.state_dict()[key]), key
    with pytest.raises(DeviceError, match="^--device tpu: unknown device"):
        fxfuse.compile([a, b], args, device="tpu", **kw)


@pytest.fixture
def moved_to_cpu(monkeypatch):
    """Every stage takes the path that moves operands to a device, with the CPU as that device."""
    monkeypatch.setattr(inputs_pass, "compute_device", lambda name: torch.device("cpu"))


def _inputs(args):
    return ((), {"example_kwargs": args}) if isinstance(args, dict) else (args, {})


def _same(plain, moved, atol: float):
    for i, (pa, ma) in enumerate(zip(plain.alignments, moved.alignments)):
        if pa is None:
            assert ma is None
            continue
        assert pa.maps.keys() == ma.maps.keys()
        for s, m in pa.maps.items():
            other = ma.maps[s]
            if m.perm is not None:
                assert torch.equal(m.perm, other.perm), f"model {i} space {s}"
            if m.q is not None:
                torch.testing.assert_close(m.q, other.q, atol=atol, rtol=0)
    fused, again = plain.module.state_dict(), moved.module.state_dict()
    for key, value in fused.items():
        torch.testing.assert_close(value, again[key], atol=atol, rtol=0, msg=key)


@pytest.mark.parametrize("name,options", [
    ("llama", {}),
    ("bert", {"cost": "activations", "calib": 24}),
    ("gpt2", {"groups": "full"}),
    ("llama", {"groups": "full", "cost": "activations", "calib": 24}),
])
def test_every_mode_on_a_device_gives_the_same_maps(name, options, moved_to_cpu, monkeypatch):
    a, args = zoo.ZOO[name](seed=0)
    b, _ = zoo.ZOO[name](seed=1)
    args, kw = _inputs(args)
    moved = fxfuse.compile([a, b], args, **kw, **options)
    monkeypatch.setattr(inputs_pass, "compute_device", lambda name: None)
    plain = fxfuse.compile([a, b], args, **kw, **options)
    _same(plain, moved, atol=1e-6)


def test_refinement_on_a_device_gives_the_same_maps(moved_to_cpu, monkeypatch):
    a, args = zoo.gpt2(seed=0)
    b, _ = zoo.gpt2(seed=1)
    ids = torch.randint(0, zoo.VOCAB, (16, zoo.SEQ), generator=torch.Generator().manual_seed(0))
    config = RefineConfig(4, ids, ids.clone(), batch_size=8, eval_samples=16)
    args, kw = _inputs(args)
    moved = fxfuse.compile([a, b], args, refine=config, **kw)
    monkeypatch.setattr(inputs_pass, "compute_device", lambda name: None)
    plain = fxfuse.compile([a, b], args, refine=config, **kw)
    _same(plain, moved, atol=1e-6)
    assert moved.report["refine"]["loss_at_weights_after"] == pytest.approx(
        plain.report["refine"]["loss_at_weights_after"], rel=1e-5)
