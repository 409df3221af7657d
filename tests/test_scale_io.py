"""Out-of-core fusion of Hugging Face directories: lazy reading, sharded checkpoints, streamed checks and output."""
from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

import fxfuse
from fxfuse.commands.cli import main
from fxfuse.models.io import load_model
from fxfuse.backend.lazy import CheckpointTensors, offload, run_streamed, save_hf_out_of_core
from fxfuse.frontend.verify import output_tensors, relative_error

transformers = pytest.importorskip("transformers")


def _llama(seed: int, dtype=torch.float32):
    config = transformers.LlamaConfig(hidden_size=32, intermediate_size=72, num_hidden_layers=2, num_attention_heads=4,
                                      num_key_value_heads=2, vocab_size=96, max_position_embeddings=64)
    torch.manual_seed(seed)
    return transformers.LlamaForCausalLM(config).eval().to(dtype)


@pytest.fixture(scope="module")
def pair(tmp_path_factory) -> tuple[Path, Path, Path]:
    """Two independently initialised tiny Llamas: A in one file and in shards, B in shards."""
    root = tmp_path_factory.mktemp("hf")
    a, b = _llama(0), _llama(1)
    a.save_pretrained(root / "a")
    a.save_pretrained(root / "a-sharded", max_shard_size="40KB")
    b.save_pretrained(root / "b-sharded", max_shard_size="40KB")
    assert (root / "a-sharded" / "model.safetensors.index.json").is_file()
    return root / "a", root / "a-sharded", root / "b-sharded"


def _compile(out: Path, *models, extra=()) -> Path:
    assert main(["compile", *map(str, models), "-o", str(out), "-q", *extra]) == 0
    return out


def _tensors(path: Path) -> dict[str, torch.Tensor]:
    t = CheckpointTensors.from_dir(path)
    return {k: t[k] for k in t}


def test_out_of_core_output_equals_in_memory_fusion(tmp_path, pair):
    a, _, b = pair
    out = _compile(tmp_path / "out", a, b)
    la, lb = load_model(str(a)), load_model(str(b))
    in_memory = fxfuse.compile([la.module, lb.module], (), example_kwargs=la.kwargs).module
    written = _tensors(out)
    expected = in_memory.state_dict()
    assert written.keys() <= expected.keys() and written
    for k, t in written.items():
        assert torch.equal(t, expected[k]), k
    loaded = transformers.LlamaForCausalLM.from_pretrained(str(out)).eval()  # loads as transformers writes it
    ids = la.kwargs["input_ids"]
    with torch.no_grad():
        assert torch.equal(loaded(input_ids=ids).logits, in_memory(input_ids=ids).logits)
    report = json.loads((out / "report.json").read_text())
    assert report["self_check"][1]["error"] <= 1e-4


def test_sharded_input_gives_the_same_output_as_one_file(tmp_path, pair):
    a, a_sharded, b = pair
    one, sharded = _compile(tmp_path / "one", a, b), _compile(tmp_path / "sharded", a_sharded, b)
    x, y = _tensors(one), _tensors(sharded)
    assert x.keys() == y.keys() and all(torch.equal(x[k], y[k]) for k in x)


def test_output_is_written_in_shards_with_an_index(tmp_path, pair):
    a, _, _ = pair
    loaded = load_model(str(a))
    state = loaded.module.state_dict()
    out = save_hf_out_of_core(loaded, state, tmp_path / "out", shard_bytes=20_000)
    index = json.loads((out / "model.safetensors.index.json").read_text())
    shards = sorted({f for f in index["weight_map"].values()})
    assert len(shards) > 2 and all((out / f).is_file() for f in shards)
    assert not (out / "model.safetensors").exists()
    back = transformers.LlamaForCausalLM.from_pretrained(str(out)).state_dict()
    assert all(torch.equal(back[k], state[k]) for k in state)


def test_streamed_run_equals_the_model_and_holds_no_weights(pair):
    a, _, _ = pair
    loaded = load_model(str(a))
    ref = output_tensors(loaded.module(**loaded.kwargs))
    skeleton = load_model(str(a)).module
    offload(skeleton)
    out = output_tensors(run_streamed(skeleton, CheckpointTensors.from_dir(a).with_aliases({}), (), loaded.kwargs))
    assert relative_error(ref, out) == 0.0
    assert all(p.device.type == "meta" for p in skeleton.parameters())  # given back after each submodule


def test_missing_shard_is_named(tmp_path, pair):
    _, a_sharded, b = pair
    broken = tmp_path / "broken"
    broken.mkdir()
    for f in a_sharded.iterdir():
        if not f.name.startswith("model-00002"):
            (broken / f.name).write_bytes(f.read_bytes())
    assert main(["compile", str(broken), str(b), "-o", str(tmp_path / "out"), "-q"]) == 2
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_half_precision_in_and_out(tmp_path, dtype):
    a, b = tmp_path / "a", tmp_path / "b"
    _llama(0, dtype).save_pretrained(a)
    _llama(1, dtype).save_pretrained(b)
    out = _compile(tmp_path / "out", a, b)
    written = _tensors(out)
    assert {t.dtype for t in written.values()} == {dtype}
    report = json.loads((out / "report.json").read_text())
    assert report["self_check"][1]["error"] <= 1e-4  # checked in float32
    moved = [s for s in report["spaces"] for m in s["models"] if m["units_moved"]]
    assert moved  # independently initialised: the alignment moved units
    as_float = _compile(tmp_path / "out32", a, b, extra=("--dtype", "float32"))
    written32 = _tensors(as_float)
    assert {t.dtype for t in written32.values()} == {torch.float32}
    # the half output is the float32 result rounded once
    assert all(torch.equal(written32[k].to(dtype), written[k]) for k in written)
    assert any(not torch.equal(written32[k].to(dtype).float(), written32[k]) for k in written)  # not pre-rounded
    config = json.loads((as_float / "config.json").read_text())
    assert config.get("dtype", config.get("torch_dtype")) == "float32"


class _Terminal:
    """A stderr that says it is a terminal and keeps what is written."""

    def __init__(self):
        self.text = ""

    def write(self, s: str) -> int:
        self.text += s
        return len(s)

    def flush(self) -> None:
        pass

    def isatty(self) -> bool:
        return True


@pytest.mark.parametrize("quiet", [False, True])
def test_progress_bars_on_a_terminal_only(tmp_path, pair, monkeypatch, quiet):
    a, _, b = pair
    term = _Terminal()
    monkeypatch.setattr("sys.stderr", term)
    assert main(["compile", str(a), str(b), "-o", str(tmp_path / "out")] + (["-q"] if quiet else [])) == 0
    bars = ("checking weights", "solving, pass 1", "checking:", "writing:")
    if quiet:
        assert term.text == ""
    else:
        for name in bars:
            assert f"{name}" in term.text and "it/s]" in term.text, name
    piped = _Terminal()
    piped.isatty = lambda: False
    monkeypatch.setattr("sys.stderr", piped)
    assert main(["compile", str(a), str(b), "-o", str(tmp_path / "out2")]) == 0
    assert "it/s]" not in piped.text and "solving" in piped.text  # phase messages without bars


class _ReadsChildWeight(torch.nn.Module):
    """Reads its child's weight outside the child's forward, as nn.MultiheadAttention does with out_proj."""

    def __init__(self):
        super().__init__()
        self.inner = torch.nn.Linear(6, 6)
        self.out = torch.nn.Linear(6, 3)

    def forward(self, x):
        return torch.nn.functional.linear(self.inner(x), self.out.weight, self.out.bias)


def test_streamed_run_falls_back_when_a_module_reads_another_modules_weights(tmp_path):
    from safetensors.torch import save_file

    torch.manual_seed(0)
    model = _ReadsChildWeight().eval()
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp_path / "model.safetensors"))
    x = torch.randn(4, 6)
    skeleton = offload(_ReadsChildWeight().eval())
    out = run_streamed(skeleton, CheckpointTensors.from_dir(tmp_path), (x,))
    assert torch.equal(out, model(x))


def test_models_that_do_not_trace_without_weights_are_loaded_in_memory(tmp_path, capsys):
    import zoo

    for seed in (0, 1):
        zoo.resnet(seed=seed)[0].save_pretrained(tmp_path / f"m{seed}")
    out = tmp_path / "out"
    assert main(["compile", str(tmp_path / "m0"), str(tmp_path / "m1"), "-o", str(out)]) == 0
    assert "loading them in memory" in capsys.readouterr().err
    report = json.loads((out / "report.json").read_text())
    assert report["self_check"][1]["error"] <= 1e-4
    assert transformers.ResNetForImageClassification.from_pretrained(str(out)) is not None


def test_tied_embeddings_out_of_core_equal_in_memory(tmp_path):
    import zoo

    for seed in (0, 1):
        zoo.bert_mlm(seed=seed)[0].save_pretrained(tmp_path / f"m{seed}")
    a, b = str(tmp_path / "m0"), str(tmp_path / "m1")
    stored = CheckpointTensors.from_dir(tmp_path / "m0")
    assert "cls.predictions.decoder.weight" not in stored.files  # stored once, under the embedding's name
    out = _compile(tmp_path / "out", a, b)
    la, lb = load_model(a), load_model(b)
    expected = fxfuse.compile([la.module, lb.module], (), example_kwargs=la.kwargs).module.state_dict()
    written = _tensors(out)
    assert written and all(torch.equal(t, expected[k]) for k, t in written.items())


def test_a_stale_buffer_only_the_target_stores_is_written_from_it(tmp_path):
    """An older checkpoint may still hold a buffer its class no longer loads (BERT's ``position_ids``): fused
    with a newer save that lacks it, the weights are fused as without it and the buffer is the target's."""
    import zoo
    from safetensors.torch import save_file

    for seed in (0, 1):
        zoo.bert_mlm(seed=seed)[0].save_pretrained(tmp_path / f"m{seed}")
    old = tmp_path / "old"
    zoo.bert_mlm(seed=0)[0].save_pretrained(old)
    stored = _tensors(old)
    stale = torch.arange(64).unsqueeze(0)
    save_file({**stored, "bert.embeddings.position_ids": stale}, str(old / "model.safetensors"),
              metadata={"format": "pt"})
    expected = _tensors(_compile(tmp_path / "new", tmp_path / "m0", tmp_path / "m1"))
    written = _tensors(_compile(tmp_path / "out", old, tmp_path / "m1"))
    assert torch.equal(written.pop("bert.embeddings.position_ids"), stale)
    assert written.keys() == expected.keys()
    assert all(torch.equal(t, expected[k]) for k, t in written.items())


def test_activations_out_of_core_equal_in_memory_fusion(tmp_path, pair):
    """``--cost activations`` on Hugging Face twins runs both graphs op by op with each weight read from its file
    by the op that uses it: the statistics, maps and written weights are the in-memory fusion's."""
    import fxfuse.planner.activations as activations

    a, _, b = pair
    streamed = []
    original = activations._Streamed._read

    def counted(self, value):
        if isinstance(value, activations._Stored):
            streamed.append(value.name)
        return original(self, value)

    activations._Streamed._read = counted
    try:
        out = _compile(tmp_path / "out", a, b, extra=["--cost", "activations", "--calib-random", "32"])
    finally:
        activations._Streamed._read = original
    assert streamed  # the weights were read op by op, not held
    la, lb = load_model(str(a)), load_model(str(b))
    expected = fxfuse.compile([la.module, lb.module], (), example_kwargs=la.kwargs, cost="activations",
                              calib=32)
    assert any(m["units_moved"] for s in expected.report["spaces"] for m in s["models"])
    written = _tensors(out)
    assert written.keys() <= expected.module.state_dict().keys() and written
    for k, t in written.items():
        assert torch.equal(t, expected.module.state_dict()[k]), k
    report = json.loads((out / "report.json").read_text())
    assert [s["models"] for s in report["spaces"]] == json.loads(json.dumps([s["models"] for s in
                                                                           expected.report["spaces"]]))


def _with_norm_values(model, seed: int):
    """``model`` with every 1-D parameter (norm scales and shifts, biases) moved off its initial value, so that
    folding the norm scales changes the weights."""
    g = torch.Generator().manual_seed(100 + seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() == 1:
                p.add_(0.3 * torch.randn(p.shape, generator=g))
    return model


def _twins(root: Path, kind: str) -> tuple[str, str]:
    def make(seed):
        torch.manual_seed(seed)
        if kind == "llama":  # pre-norm, RMSNorm scales folded into q/k/v and the MLP
            return _llama(seed)
        if kind == "gpt2":  # pre-norm, LayerNorm scale and shift folded into Conv1D (addmm) readers
            return transformers.GPT2LMHeadModel(transformers.GPT2Config(n_embd=32, n_layer=2, n_head=4,
                                                                        vocab_size=96, n_positions=64)).eval()
        return transformers.BertModel(transformers.BertConfig(  # post-norm: no fold, heads by Procrustes
            hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4, vocab_size=96,
            max_position_embeddings=64)).eval()

    for seed in (0, 1):
        _with_norm_values(make(seed), seed).save_pretrained(root / f"{kind}{seed}")
    return str(root / f"{kind}0"), str(root / f"{kind}1")


ACTIVATIONS = ("--cost", "activations", "--calib-random", "16")
REPAIR = ("--repair", "--calib-random", "16")


def _options(extra) -> dict:
    """``fxfuse.compile`` keywords of the CLI options ``extra``."""
    return {**(dict(cost="activations", calib=16) if "activations" in extra else {}),
            **(dict(repair=True, calib=16) if "--repair" in extra else {})}


@pytest.mark.parametrize("kind, extra", [("llama", ()), ("gpt2", ()), ("bert", ()), ("llama", ACTIVATIONS),
                                         ("llama", REPAIR), ("bert", REPAIR)])
def test_groups_full_out_of_core_equals_in_memory_fusion(tmp_path, monkeypatch, kind, extra):
    """``--groups full`` on Hugging Face twins: norm scales folded per tensor as it is read
    (``fxfuse.backend.streamfold``), Procrustes solved on streamed products, dense maps applied per tensor as it is
    written: the written weights are the in-memory fusion's, bit for bit, and no model is loaded in memory."""
    import fxfuse.models.io
    import fxfuse.backend.streamfold as streamfold

    a, b = _twins(tmp_path, kind)
    made = []
    original = streamfold.FoldedTensors._make
    monkeypatch.setattr(streamfold.FoldedTensors, "_make", lambda self, key: made.append(key) or original(self, key))

    def refuse(*_a, **_k):
        raise AssertionError("loaded in memory")

    with monkeypatch.context() as m:
        m.setattr(fxfuse.models.io, "load_model", refuse)
        out = _compile(tmp_path / "out", a, b, extra=("--groups", "full", *extra))
    la, lb = load_model(a), load_model(b)
    expected = fxfuse.compile([la.module, lb.module], (), example_kwargs=la.kwargs, groups="full", **_options(extra))
    report = json.loads((out / "report.json").read_text())
    folded = [f for c in report["canonicalize"] for f in c["folded"]]
    assert bool(folded) == (kind != "bert") and bool(made) == (kind != "bert")  # BERT's norms feed residual adds
    solvers = {m["solver"] for s in report["spaces"] for m in s["models"]}
    assert any("procrustes" in s for s in solvers), solvers  # dense maps, not only permutations
    assert report["canonicalize"] == json.loads(json.dumps(expected.report["canonicalize"]))
    written, state = _tensors(out), expected.module.state_dict()
    assert written and written.keys() <= state.keys()
    for k, t in written.items():
        assert torch.equal(t, state[k]), k
    assert report["self_check"][1]["error"] <= 1e-4
    if "--repair" in extra:
        assert report["repair"] == json.loads(json.dumps(expected.report["repair"]))
        assert any(p["units"] for p in report["repair"]["points"])


@pytest.mark.parametrize("dtype", [None, "bfloat16"])
def test_repair_out_of_core_equals_in_memory_fusion(tmp_path, monkeypatch, dtype):
    """``--repair`` (permutations) on Hugging Face twins: the graph runs op by op on fused weights made per
    tensor, the corrections are kept as vectors and applied as each tensor is written; ``--dtype`` rounds the
    repaired weights once, as converting the in-memory result does."""
    import fxfuse.models.io
    import fxfuse.backend.streamrepair as streamrepair

    a, b = _twins(tmp_path, "gpt2")
    folds = []
    original = streamrepair.RepairedTensors.fold
    monkeypatch.setattr(streamrepair.RepairedTensors, "fold",
                        lambda self, *a: folds.append(a[0].weight) or original(self, *a))
    with monkeypatch.context() as m:
        m.setattr(fxfuse.models.io, "load_model", lambda *_a, **_k: pytest.fail("loaded in memory"))
        out = _compile(tmp_path / "out", a, b, extra=REPAIR + (("--dtype", dtype) if dtype else ()))
    assert folds  # repaired out of core, the folds kept as vectors
    la, lb = load_model(a), load_model(b)
    expected = fxfuse.compile([la.module, lb.module], (), example_kwargs=la.kwargs, repair=True, calib=16)
    state = expected.module.to(getattr(torch, dtype)).state_dict() if dtype else expected.module.state_dict()
    written = _tensors(out)
    assert written and written.keys() <= state.keys()
    for k, t in written.items():
        assert torch.equal(t, state[k]), k
    report = json.loads((out / "report.json").read_text())
    assert report["repair"] == json.loads(json.dumps(expected.report["repair"]))


def test_groups_full_with_untie_is_fused_in_memory(tmp_path, capsys):
    """Untying a weight changes the module: out of core it is refused, so the CLI loads the models."""
    a, b = _twins(tmp_path, "gpt2")
    out = tmp_path / "out"
    assert main(["compile", a, b, "-o", str(out), "--groups", "full", "--untie"]) == 0
    assert f"loading {a}" in capsys.readouterr().err
    la, lb = load_model(a), load_model(b)
    expected = fxfuse.compile([la.module, lb.module], (), example_kwargs=la.kwargs, groups="full", untie=True)
    written, state = _tensors(out), expected.module.state_dict()
    assert written and all(torch.equal(t, state[k]) for k, t in written.items())
