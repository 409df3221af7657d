"""Language models with different vocabularies: rows matched by token string (``fxfuse.models.vocab``).

Tiny GPT-2 and BERT models are built here with WordLevel tokenizers whose vocabularies overlap partly and in
other orders. A model fused with its own copy, vocabulary shuffled and hidden units permuted, gives the
original back; union sizes, tokenizer files, report and card counts, errors and determinism through the CLI.
"""
from __future__ import annotations

import json

import pytest
import torch

from fxfuse import compile as fuse
from fxfuse.models.io import hf_example_inputs
from fxfuse.api.permute import permute
from fxfuse.models.vocab import VocabError, match, read_vocab, reindex

from clirun import refused, run

WORDS = ["[UNK]", "[PAD]"] + [f"w{i}" for i in range(46)]


def _tokenizer(tokens):
    from tokenizers import Tokenizer, models, pre_tokenizers

    tok = Tokenizer(models.WordLevel({t: i for i, t in enumerate(tokens)}, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


def _gpt2(vocab: int, seed: int = 0, tied: bool = True):
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    cfg = GPT2Config(vocab_size=vocab, n_embd=16, n_layer=2, n_head=2, n_positions=32, use_cache=False,
                     bos_token_id=0, eos_token_id=0, tie_word_embeddings=tied)
    return GPT2LMHeadModel(cfg).eval()


def _bert(vocab: int, seed: int = 0):
    from transformers import BertConfig, BertForMaskedLM

    torch.manual_seed(seed)
    cfg = BertConfig(vocab_size=vocab, hidden_size=16, num_hidden_layers=2, num_attention_heads=2,
                     intermediate_size=32, max_position_embeddings=32, pad_token_id=1)
    return BertForMaskedLM(cfg).eval()


def _save(model, tokens, folder):
    model.save_pretrained(folder)
    _tokenizer(tokens).save(str(folder / "tokenizer.json"))
    return str(folder)


def _shuffled_copy(model, tokens, seed: int):
    """``model`` with its vocabulary in another order and its hidden units permuted: the same function."""
    order = torch.randperm(len(tokens), generator=torch.Generator().manual_seed(seed))
    moved = reindex(model, order)
    return permute(moved, (), seed=seed, example_kwargs=hf_example_inputs(moved)), [tokens[i] for i in order]


def _overlapping(vocab_a, drop: int, extra: int, seed: int):
    """Another vocabulary: ``vocab_a`` less ``drop`` tokens, plus ``extra`` new ones, shuffled."""
    g = torch.Generator().manual_seed(seed)
    kept = [vocab_a[i] for i in sorted(torch.randperm(len(vocab_a), generator=g)[: len(vocab_a) - drop].tolist())]
    tokens = kept + [f"x{i}" for i in range(extra)]
    return [tokens[i] for i in torch.randperm(len(tokens), generator=g)]


@pytest.mark.parametrize("build", [_gpt2, lambda v: _gpt2(v, tied=False), _bert], ids=["gpt2", "gpt2-untied", "bert"])
def test_a_shuffled_permuted_copy_fuses_back_to_the_original(build):
    a = build(len(WORDS))
    b, words_b = _shuffled_copy(a, WORDS, seed=3)
    assert not torch.equal(b.get_input_embeddings().weight, a.get_input_embeddings().weight)
    kw = hf_example_inputs(a)
    result = fuse([a, b], (), example_kwargs=kw, vocab="target", vocabularies=[WORDS, words_b])
    want, got = a.state_dict(), result.module.state_dict()
    assert want.keys() == got.keys()
    for k in want:
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6, msg=k)
    v = result.report["vocab"]
    assert (v["mode"], v["size"], v["shared"]) == ("target", len(WORDS), len(WORDS))
    assert all(c["error"] <= 1e-4 for c in result.report["self_check"])


def test_union_rows_come_from_the_model_that_has_them_moved_into_the_targets_basis():
    a = _gpt2(len(WORDS))
    b, words_b = _shuffled_copy(a, WORDS, seed=5)
    words_a = WORDS[:30]  # the target's tokenizer names 30 of its 48 rows: the others are kept, unnamed
    result = fuse([a, b], (), example_kwargs=hf_example_inputs(a), vocab="union", vocabularies=[words_a, words_b])
    v = result.report["vocab"]
    assert v["size"] == 48 + 18 and v["shared"] == 30
    assert [m["kept"] for m in v["models"]] == [48, 48] and v["models"][1]["shared_with_target"] == 30
    wte = result.module.transformer.wte.weight
    assert result.module.config.vocab_size == 66 and result.module.lm_head.weight is wte
    ref = a.transformer.wte.weight
    torch.testing.assert_close(wte[:48], ref, rtol=0, atol=1e-6)  # the target's rows (shared ones: both agree)
    extra = [WORDS.index(t) for t in words_b if t not in words_a]  # b's other tokens, appended in b's order
    torch.testing.assert_close(wte[48:], ref[extra], rtol=0, atol=1e-6)  # b's rows, moved into a's basis


def test_shared_rows_are_averaged_and_the_others_taken_whole():
    a, c = _gpt2(len(WORDS), seed=0), _gpt2(len(WORDS), seed=1)
    words_c = _overlapping(WORDS, drop=12, extra=8, seed=2)
    c = reindex(c, torch.arange(len(words_c)).remainder(len(WORDS)))  # c's rows: one per token of words_c
    result = fuse([a, c], (), example_kwargs=hf_example_inputs(a), vocab="target", vocabularies=[WORDS, words_c])
    aligned = result.aligned[1].transformer.wte.weight
    fused, own = result.module.transformer.wte.weight, a.transformer.wte.weight
    has_c = torch.tensor([t in words_c for t in WORDS])
    assert int(has_c.sum()) == result.report["vocab"]["shared"] == len(WORDS) - 12
    torch.testing.assert_close(fused[~has_c], own[~has_c], rtol=0, atol=1e-6)
    torch.testing.assert_close(fused[has_c], (own[has_c] + aligned[has_c]) / 2, rtol=0, atol=1e-6)
    assert torch.count_nonzero(aligned[~has_c]) == 0


def test_the_alignment_reads_only_shared_rows():
    """Rows one model lacks are zero in its re-indexed copy, so they add nothing to the weight-matching cost:
    changing the target's rows of tokens the source lacks changes no map."""
    a, b = _gpt2(len(WORDS), seed=0), _gpt2(len(WORDS), seed=1)
    words_b = WORDS[:20] + [f"x{i}" for i in range(28)]
    kw = hf_example_inputs(a)
    first = fuse([a, b], (), example_kwargs=kw, vocab="target", vocabularies=[WORDS, words_b])
    with torch.no_grad():
        a.transformer.wte.weight[20:] = torch.randn(len(WORDS) - 20, 16, generator=torch.Generator().manual_seed(9))
    second = fuse([a, b], (), example_kwargs=kw, vocab="target", vocabularies=[WORDS, words_b])
    for k, t in first.aligned[1].state_dict().items():
        if "wte" not in k and "lm_head" not in k:
            assert torch.equal(t, second.aligned[1].state_dict()[k]), k


def test_match_orders_and_errors():
    found = match([["a", "b", "c"], ["c", "d", "a"]], [3, 4], 0, "union")
    assert found.tokens == ("a", "b", "c", "d")
    assert found.index[1].tolist() == [2, -1, 0, 1] and found.shared_ids.tolist() == [0, 2]
    with pytest.raises(VocabError, match="m1: shares no token with the target"):
        match([["a"], ["b"]], [1, 1], 0, "target", ["m0", "m1"])
    with pytest.raises(VocabError, match="the tokenizer has 3 tokens, the model only 2"):
        match([["a", "b", "c"], ["a"]], [2, 1], 0, "target")


def _pair(tmp_path, build=_gpt2):
    a = build(len(WORDS))
    words_b = _overlapping(WORDS, drop=10, extra=6, seed=4)
    b = build(len(words_b), seed=1)
    return _save(a, WORDS, tmp_path / "a"), _save(b, words_b, tmp_path / "b"), words_b


def test_cli_union_writes_the_union_tokenizer_config_report_and_card(tmp_path, capsys):
    from transformers import AutoModelForCausalLM, PreTrainedTokenizerFast

    spec_a, spec_b, words_b = _pair(tmp_path)
    out = tmp_path / "fused"
    code, _, err = run(capsys, "compile", spec_a, spec_b, "-o", out, "--vocab", "union", "--quiet")
    assert code == 0, err
    union = WORDS + [t for t in words_b if t not in WORDS]
    assert read_vocab(out) == tuple(union)
    assert json.loads((out / "config.json").read_text())["vocab_size"] == len(union)
    model = AutoModelForCausalLM.from_pretrained(out)
    assert model.get_input_embeddings().weight.shape == (len(union), 16)
    tok = PreTrainedTokenizerFast.from_pretrained(out)
    assert tok.convert_tokens_to_ids(["w3", "x5"]) == [union.index("w3"), union.index("x5")]
    report = json.loads((out / "report.json").read_text())
    assert report["vocab"]["shared"] == len(WORDS) - 10 and report["vocab"]["size"] == len(union)
    card = (out / "README.md").read_text()
    assert f"{len(WORDS) - 10} tokens are shared by every parent" in card
    assert "vocab: union" in (out / "fxfuse-recipe.yaml").read_text()


def test_cli_target_copies_the_targets_tokenizer_and_is_deterministic(tmp_path, capsys):
    spec_a, spec_b, _ = _pair(tmp_path, _bert)
    outs = [tmp_path / "f1", tmp_path / "f2"]
    for out in outs:
        code, _, err = run(capsys, "compile", spec_a, spec_b, "-o", out, "--vocab", "target", "--quiet")
        assert code == 0, err
    assert (outs[0] / "tokenizer.json").read_bytes() == (tmp_path / "a" / "tokenizer.json").read_bytes()
    assert (outs[0] / "config.json").read_bytes() == (tmp_path / "a" / "config.json").read_bytes()
    assert (outs[0] / "model.safetensors").read_bytes() == (outs[1] / "model.safetensors").read_bytes()
    code, _, err = run(capsys, "compile", outs[0] / "fxfuse-recipe.yaml", "-o", tmp_path / "f3", "--quiet")
    assert code == 0, err
    assert (tmp_path / "f3" / "model.safetensors").read_bytes() == (outs[0] / "model.safetensors").read_bytes()


def test_cli_errors_name_the_model_directory(tmp_path, capsys):
    spec_a, spec_b, _ = _pair(tmp_path)
    out = str(tmp_path / "o")
    capsys.readouterr()  # what saving the models printed
    line = refused(capsys, tmp_path, "compile", spec_a, spec_b, "-o", out)
    assert line.startswith(f"{spec_a}: the vocabularies differ in size")
    assert "pass --vocab target or --vocab union" in line
    (tmp_path / "b" / "tokenizer.json").unlink()
    for extra in ([], ["--vocab", "union"]):
        assert refused(capsys, tmp_path, "compile", spec_a, spec_b, "-o", out, *extra).startswith(
            f"{spec_b}: no tokenizer.json")
    (tmp_path / "b" / "tokenizer.json").write_text((tmp_path / "a" / "tokenizer.json").read_text())
    torch.save((torch.zeros(2, 4, dtype=torch.long), torch.zeros(2, 4, dtype=torch.long)), tmp_path / "eval.pt")
    line = refused(capsys, tmp_path, "compile", spec_a, spec_b, "-o", out, "--vocab", "union", "--eval",
                   tmp_path / "eval.pt")
    assert line.startswith(f"--eval {tmp_path / 'eval.pt'}: with --vocab the parents do not share")
    _save(_gpt2(5, seed=2), [f"y{i}" for i in range(5)], tmp_path / "c")
    capsys.readouterr()
    line = refused(capsys, tmp_path, "compile", spec_a, str(tmp_path / "c"), "-o", out, "--vocab", "target")
    assert line == f"{tmp_path / 'c'}: shares no token with the target ({spec_a})"


def _bpe(texts, size: int):
    from tokenizers import Tokenizer, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE(unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    tok.train_from_iterator(texts, trainers.BpeTrainer(vocab_size=size, special_tokens=["[UNK]"]))
    return tok


def test_cli_union_of_bpe_tokenizers_keeps_both_models_merges(tmp_path, capsys):
    """Two BPE tokenizers learnt on different text: the union tokenizer holds every token at its union id and
    splits each model's words as its own tokenizer did (the target's merges first, then the source's)."""
    from fxfuse.models.vocab import read_vocab

    tok_a = _bpe(["the quick brown fox jumps over the lazy dog " * 5, "hello world foo bar"], 60)
    tok_b = _bpe(["a stitch in time saves nine the fox " * 5, "hello there world"], 60)
    for name, tok, seed in (("a", tok_a, 0), ("b", tok_b, 1)):
        _gpt2(tok.get_vocab_size(), seed=seed).save_pretrained(tmp_path / name)
        tok.save(str(tmp_path / name / "tokenizer.json"))
    out = tmp_path / "fused"
    code, _, err = run(capsys, "compile", tmp_path / "a", tmp_path / "b", "-o", out, "--vocab", "union", "--quiet")
    assert code == 0, err
    words_a, words_b = read_vocab(tmp_path / "a"), read_vocab(tmp_path / "b")
    union = read_vocab(out)
    assert union == words_a + tuple(t for t in words_b if t not in words_a)
    from tokenizers import Tokenizer

    fused = Tokenizer.from_file(str(out / "tokenizer.json"))
    for tok, text in ((tok_a, "the quick brown fox"), (tok_b, "a stitch in time saves nine")):
        assert fused.encode(text).tokens == tok.encode(text).tokens
    report = json.loads((out / "report.json").read_text())
    assert report["vocab"]["shared"] == len(set(words_a) & set(words_b))


def test_a_recipe_of_model_directories_reads_their_tokenizers(tmp_path):
    from fxfuse import Recipe

    spec_a, spec_b, words_b = _pair(tmp_path)
    result = fuse(Recipe(models=(spec_a, spec_b), vocab="union"))
    assert result.report["vocab"]["size"] == len(WORDS) + len(set(words_b) - set(WORDS))
    assert result.module.config.vocab_size == result.report["vocab"]["size"]


def test_quality_best_scores_candidates_on_the_matched_models(tmp_path):
    spec_a, spec_b, words_b = _pair(tmp_path)
    a, b = _gpt2(len(WORDS)), _gpt2(len(words_b), seed=1)
    calib = torch.randint(2, len(WORDS), (10, 8), generator=torch.Generator().manual_seed(0))
    result = fuse([a, b], (), example_kwargs=hf_example_inputs(a), vocab="target", vocabularies=[spec_a, spec_b],
                  quality="best", calib=calib)
    assert result.report["quality"]["chosen"] and result.report["vocab"]["shared"] == len(WORDS) - 10
    missing = sum(t not in words_b for t in WORDS[2:])  # calibration ids are drawn from 2 on
    assert any(n.endswith("are missing from some model's vocabulary (it reads a zero embedding row there): "
                          "calibrate on text made of shared tokens") for n in result.report["notes"]) == (missing > 0)
    assert all(c.get("error", 0.0) <= 1e-4 for c in result.report["self_check"])


def test_refinement_mixes_vocabulary_rows_per_row_and_stays_exact():
    from fxfuse.backend.refine import RefineConfig, _mix

    has = torch.tensor([[True, True, False], [True, False, True]])
    states = [{"e": torch.tensor([[1.0], [2.0], [0.0]])}, {"e": torch.tensor([[3.0], [0.0], [5.0]])}]
    mixed = _mix(states, [0.25, 0.75], states[0], (("e",), has))["e"]
    assert mixed.flatten().tolist() == [2.5, 2.0, 5.0]
    a, b = _gpt2(len(WORDS)), _gpt2(len(WORDS), seed=1)
    words_b = _overlapping(WORDS, drop=10, extra=10, seed=6)
    x = torch.randint(2, len(WORDS), (16, 8), generator=torch.Generator().manual_seed(1))
    result = fuse([a, b], (), example_kwargs=hf_example_inputs(a), vocab="target", vocabularies=[WORDS, words_b],
                  refine=RefineConfig(5, x, x.clone(), head="causal"))
    assert "refine" in result.report and all(c["error"] <= 1e-4 for c in result.report["self_check"])


def test_same_size_tokenizers_that_differ_are_refused_without_vocab(tmp_path, capsys):
    """Rows are fused by id without --vocab: two tokenizers that give one id different tokens are refused
    (their rows would average different tokens); the same tokenizer on both sides fuses as before."""
    a = _gpt2(len(WORDS))
    words_b = WORDS[:2] + WORDS[2:][::-1]  # the same tokens, other ids
    spec_a, spec_b = _save(a, WORDS, tmp_path / "a"), _save(_gpt2(len(WORDS), seed=1), words_b, tmp_path / "b")
    capsys.readouterr()
    line = refused(capsys, tmp_path, "compile", spec_a, spec_b, "-o", str(tmp_path / "o"))
    assert line == (f"{spec_b}: its tokenizer gives {len(WORDS) - 2} of {len(WORDS)} ids other tokens than "
                    f"{spec_a}'s: pass --vocab target or --vocab union to match their rows by token string")
    same = _save(_gpt2(len(WORDS), seed=1), WORDS, tmp_path / "c")
    capsys.readouterr()
    code, _, err = run(capsys, "compile", spec_a, same, "-o", tmp_path / "f", "--quiet")
    assert code == 0, err
    code, _, err = run(capsys, "compile", spec_a, spec_b, "-o", tmp_path / "g", "--quiet", "--vocab", "target")
    assert code == 0, err
