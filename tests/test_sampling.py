"""Sequences sampled from the parents (``fxfuse.models.sampling``, ``--sample``): fusion without a dataset."""
from __future__ import annotations

import json

import pytest
import torch
from torch import nn

from fxfuse import sample_sequences
from fxfuse.models.sampling import SamplingError

from clirun import refused, run

V, T = 11, 12


class Successor(nn.Module):
    """A causal LM that is sure token ``x_t`` is followed by ``(x_t + step) mod V``."""

    def __init__(self, step: int):
        super().__init__()
        self.table = nn.Parameter(40.0 * torch.roll(torch.eye(V), step, dims=1))

    def forward(self, ids):
        return self.table[ids]  # (N, T, V)


class WholeOnly(Successor):
    """The same LM, traced at one length: it refuses prefixes."""

    def forward(self, ids):
        if ids.shape[1] != T:
            raise RuntimeError(f"expected sequences of {T} tokens")
        return super().forward(ids)


class WideHead(nn.Module):
    """Predicts V tokens but embeds only V − 2: its own predictions cannot be fed back."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V - 2, 4)
        self.head = nn.Linear(4, V)

    def forward(self, ids):
        return self.head(self.emb(ids))


class Mean(nn.Module):
    """Not causal: every position reads the mean of the whole sequence's embeddings."""

    def __init__(self):
        super().__init__()
        self.emb = nn.Embedding(V, V)

    def forward(self, ids):
        e = self.emb(ids)
        return e + e.mean(1, keepdim=True)


def _gpt2(seed: int):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=40, n_embd=16, n_layer=2, n_head=2, n_positions=16, use_cache=False,
                     bos_token_id=0, eos_token_id=0)
    return GPT2LMHeadModel(cfg).eval()


def _saved_pair(tmp_path) -> list:
    """Two tiny GPT-2s saved as Hugging Face directories."""
    for s in (0, 1):
        _gpt2(s).save_pretrained(tmp_path / f"g{s}")
    return [tmp_path / "g0", tmp_path / "g1"]


def test_each_sequence_follows_its_parent_from_a_uniform_first_token():
    ids = torch.zeros((2, T), dtype=torch.long)
    x = sample_sequences([Successor(1), Successor(3)], (ids,), None, 9, seed=5)
    assert x.shape == (9, T) and x.dtype == torch.long
    for i, row in enumerate(x):
        step = 1 if i % 2 == 0 else 3  # sequence i from parent i mod 2
        assert torch.equal(row, (row[0] + step * torch.arange(T)) % V), (i, row)
    assert len(set(x[:, 0].tolist())) > 1  # the first tokens are drawn, not fixed


def test_a_model_that_takes_whole_sequences_only_gives_the_same_samples():
    ids = torch.zeros((2, T), dtype=torch.long)
    soft = [Successor(1), Successor(3)]
    for m in soft:  # not sure of the next token: the draws use the generator
        m.table.data /= 20
    whole = [WholeOnly(1), WholeOnly(3)]
    for w, m in zip(whole, soft):
        w.table.data.copy_(m.table.data)
    assert torch.equal(sample_sequences(soft, (ids,), None, 8, seed=2), sample_sequences(whole, (ids,), None, 8, seed=2))


def test_the_same_seed_gives_the_same_sequences_and_another_seed_others():
    models = [_gpt2(0), _gpt2(1)]
    ids = torch.zeros((1, 16), dtype=torch.long)
    a = sample_sequences(models, (ids,), None, 6, seed=3)
    b = sample_sequences(models, (ids,), None, 6, seed=3)
    c = sample_sequences(models, (ids,), None, 6, seed=4)
    assert torch.equal(a, b) and not torch.equal(a, c)
    assert int(a.min()) >= 0 and int(a.max()) < 40
    assert all(not m.training for m in models)
    assert a.shape == (6, 16)  # the positions the config allows (16, under the default's 64)
    assert sample_sequences(models, (ids,), None, 3, length=8).shape == (3, 8)


def test_models_that_are_not_causal_lms_over_token_ids_are_refused():
    ids = torch.zeros((2, T), dtype=torch.long)
    with pytest.raises(SamplingError, match="model 1 is not a causal LM"):
        sample_sequences([Successor(1), Mean()], (ids,), None, 4)
    with pytest.raises(SamplingError, match=f"model 0 predicts {V} tokens but cannot read token {V - 1}"):
        sample_sequences([WideHead()], (ids,), None, 4)
    with pytest.raises(SamplingError, match="not token ids"):
        sample_sequences([nn.Linear(4, 4)], (torch.zeros(2, 4),), None, 4)
    with pytest.raises(SamplingError, match="need at least one sequence"):
        sample_sequences([Successor(1)], (ids,), None, 0)


def test_cli_compile_with_sample_refines_on_the_sequences_and_says_so(tmp_path, capsys):
    specs = _saved_pair(tmp_path)
    out = tmp_path / "fused"
    code, stdout, err = run(capsys, "compile", *specs, "-o", out, "--sample", 24, "--groups", "full", "--untie",
                            "--refine", 4, "--quiet")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["sample"]["sequences"] == 24 and report["sample"]["length"] == 16
    assert report["sample"]["refine_data"] is True
    assert report["refine"]["steps"] == 4
    assert "sequences sampled from the parents" in stdout
    assert "--sample is ignored" not in err  # it is the refinement's data
    assert "No dataset was read: 24 sequences of 16 tokens were sampled from the parents" in (
        out / "README.md").read_text()
    assert "sample: 24" in (out / "fxfuse-recipe.yaml").read_text()
    assert all(c["error"] < 1e-4 for c in report["self_check"])


def test_cli_sample_alone_chooses_the_best_quality(tmp_path, capsys):
    specs = _saved_pair(tmp_path)
    out = tmp_path / "fused"
    code, _, err = run(capsys, "compile", *specs, "-o", out, "--sample", 20, "--refine", 3, "--quality", "best",
                       "--quiet")
    assert code == 0, err
    report = json.loads((out / "report.json").read_text())
    assert report["quality"]["chosen"] and report["sample"]["refine_data"] is True


def test_cli_sample_refuses_what_cannot_read_it(tmp_path, capsys):
    from transformers import BertConfig, BertForMaskedLM

    specs = _saved_pair(tmp_path)
    out = tmp_path / "fused"
    with pytest.raises(SystemExit) as exc:
        run(capsys, "compile", *specs, "-o", out, "--sample", 8, "--calib-random", 8, "-q")
    assert exc.value.code == 2 and "argument --calib-random: not allowed with argument --sample" in (
        capsys.readouterr().err)
    msg = refused(capsys, tmp_path, "compile", *specs, "-o", out, "--sample-length", 8, "-q")
    assert msg == "--sample-length 8 is only used with --sample N"
    msg = refused(capsys, tmp_path, "compile", *specs, "-o", out, "--sample", 8, "--refine", 2, "--head", "mlm", "-q")
    assert "--sample draws causal LM sequences: --head mlm" in msg
    bert = []
    for s in (0, 1):
        torch.manual_seed(s)
        cfg = BertConfig(vocab_size=40, hidden_size=16, num_hidden_layers=1, num_attention_heads=2,
                         intermediate_size=32, max_position_embeddings=16)
        BertForMaskedLM(cfg).save_pretrained(tmp_path / f"b{s}")
        bert.append(tmp_path / f"b{s}")
    msg = refused(capsys, tmp_path, "compile", *bert, "-o", out, "--sample", 8, "-q")
    assert msg.startswith("--sample: model 0 (") and "is not a causal LM" in msg


def test_cli_barrier_refines_on_sequences_sampled_from_a_and_b(tmp_path, capsys):
    specs = _saved_pair(tmp_path)
    ids = torch.randint(0, 40, (8, 16), generator=torch.Generator().manual_seed(0))
    torch.save({"inputs": ids, "labels": ids.clone()}, tmp_path / "eval.pt")
    code, out, err = run(capsys, "barrier", *specs, "--data", tmp_path / "eval.pt", "--sample", 16, "--refine", 3,
                         "--points", 3, "--json", "--quiet")
    assert code == 0, err
    result = json.loads(out)
    assert result["refined"] is not None and len(result["refined"]["loss"]) == 3


def test_cli_barrier_refuses_sample_options_before_loading(tmp_path, capsys):
    ids = torch.zeros((2, 4), dtype=torch.long)
    torch.save({"inputs": ids, "labels": ids}, tmp_path / "eval.pt")
    missing = [tmp_path / "no-a", tmp_path / "no-b"]  # never loaded: the flags are refused first
    msg = refused(capsys, tmp_path, "barrier", *missing, "--data", tmp_path / "eval.pt", "--sample-length", 8, "-q")
    assert msg == "--sample-length 8 is only used with --sample N"
    msg = refused(capsys, tmp_path, "barrier", *missing, "--data", tmp_path / "eval.pt", "--sample", 8, "--head",
                  "mlm", "-q")
    assert msg.startswith("--sample draws causal LM sequences: --head mlm")
