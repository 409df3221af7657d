"""quality best: stages scored on held-out samples, kept only where they help; the command line's preset."""
from __future__ import annotations

import json

import pytest
import torch

import digits
import fxfuse
from clirun import refused, run
from fxfuse.core.errors import FxfuseError
from fxfuse.api.fuse import FusionResult
from fxfuse.backend.refine import RefineConfig
from fxfuse.backend.stages import StageError, agreement_scorer, fuse_best, split

pytestmark = pytest.mark.usefixtures("quiet_one_thread")


def _images(n: int, seed: int) -> torch.Tensor:
    return torch.rand(n, 1, 8, 8, generator=torch.Generator().manual_seed(seed))


def _labelled(model, n: int = 40):
    """Inputs labelled by ``model``'s own predictions (it scores better than any average on them)."""
    x = _images(n, 3)
    with torch.no_grad():
        return x, model(x).argmax(-1)


def test_split_holds_out_the_last_fifth_and_at_least_one_sample():
    assert split(100) == (slice(0, 80), slice(80, 100))
    assert split(3) == (slice(0, 2), slice(2, 3))
    assert split(2) == (slice(0, 1), slice(1, 2))
    with pytest.raises(StageError, match="need at least 2, got 1"):
        split(1)


def test_agreement_is_zero_for_a_parent_fused_with_itself_and_positive_for_an_average():
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    batches = [((_images(16, 0),), {})]
    assert agreement_scorer([a, a], [1.0, 1.0], batches).score(a) == pytest.approx(0.0, abs=1e-12)
    scorer = agreement_scorer([a, b], [1.0, 1.0], batches)
    vanilla = fxfuse.compile([a, b], args, method="vanilla").module
    # KL(p̄ ‖ q) by hand for the vanilla average
    pa, pb = (torch.softmax(m(*batches[0][0]).double(), -1) for m in (a, b))
    mixed, q = (pa + pb) / 2, torch.softmax(vanilla(*batches[0][0]).double(), -1)
    assert scorer.score(vanilla) == pytest.approx(float((mixed * (mixed.log() - q.log())).sum(-1).mean()), rel=1e-6)
    assert scorer.score(vanilla) > 0


class _Fake:
    """A ``compile`` whose result depends on the options: ``good``/``bad`` modules, or a refusal."""

    def __init__(self, good, bad, bad_when, refuse_when=lambda kw: False):
        self.good, self.bad, self.bad_when, self.refuse_when, self.calls = good, bad, bad_when, refuse_when, []

    def __call__(self, models, args, **kw):
        self.calls.append(kw)
        if self.refuse_when(kw):
            raise FxfuseError("refinement of those maps is not built yet")
        module = self.bad if self.bad_when(kw) else self.good
        return FusionResult(module, (), {"notes": [], "timings": {"total_s": 0.0}})


def test_a_stage_that_makes_the_result_worse_is_dropped_and_said():
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    vanilla = fxfuse.compile([a, b], args, method="vanilla").module
    fake = _Fake(good=a, bad=vanilla, bad_when=lambda kw: kw.get("repair"))
    result = fuse_best(fake, [a, b], args, {"calib": _images(40, 0)})
    q = result.report["quality"]
    assert result.module is a and q["chosen"] == "weights, groups perm"
    repair = [c for c in q["candidates"] if c["options"].get("repair")]
    # the best alignment of each group level is repaired: perm (the chosen one) and full
    assert [c["name"] for c in repair] == ["weights, groups perm + repair", "weights, groups full + repair"]
    assert all(not c["kept"] and c["score"] > q["candidates"][0]["score"] for c in repair)
    assert any(n.startswith("quality best: stage repair dropped: it made the result worse (held-out KL ")
               for n in result.report["notes"])
    # every candidate fitted on the first 32 samples, none on the 8 held out; the kept one refitted on all 40
    assert all(kw["calib"].shape[0] == 32 and kw["quality"] == "fast" for kw in fake.calls[:-1])
    assert fake.calls[-1]["calib"].shape[0] == 40 and not fake.calls[-1].get("repair")
    assert fake.calls[-1]["quality"] == "fast"
    assert q["refit"] == {"calib_samples": 40, "score": q["candidates"][0]["score"], "kept": True}


def test_a_stage_that_helps_is_kept():
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    vanilla = fxfuse.compile([a, b], args, method="vanilla").module
    fake = _Fake(good=a, bad=vanilla, bad_when=lambda kw: not kw.get("repair"))
    result = fuse_best(fake, [a, b], args, {"calib": _images(40, 0)})
    assert result.module is a and result.report["quality"]["chosen"] == "weights, groups perm + repair"


def test_full_groups_that_cannot_be_refined_fall_back_to_the_best_refinable_alignment():
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    vanilla = fxfuse.compile([a, b], args, method="vanilla").module
    x, y = _labelled(a)
    fake = _Fake(good=a, bad=vanilla, bad_when=lambda kw: kw.get("groups") == "perm" and kw.get("refine") is None
                 or kw.get("repair"), refuse_when=lambda kw: kw.get("groups") == "full" and kw.get("refine") is not None)
    result = fuse_best(fake, [a, b], args, {"refine": RefineConfig(7, x, y)})
    q = result.report["quality"]
    names = [c["name"] for c in q["candidates"]]
    assert names[3] == "weights, groups full + refine 7" and q["candidates"][3]["reason"].startswith("skipped: ")
    assert q["score"] == "loss on 8 held-out labelled samples"
    assert any("weights, groups full + refine 7 skipped: refinement of those maps is not built yet" in n
               for n in result.report["notes"])
    refined = [kw for kw in fake.calls[:-1] if kw.get("refine") is not None]
    assert [kw.get("groups") for kw in refined] == ["full", "perm"]
    assert all(kw.get("refine").inputs.shape[0] == 32 and kw.get("refine").steps == 7 for kw in refined)
    assert q["chosen"] in ("weights, groups full", "weights, groups perm + refine 7")


def test_best_refuses_options_it_chooses_and_inputs_it_cannot_score():
    a, args = digits.vit(seed=1)
    with pytest.raises(StageError, match=r"drop --groups full, --repair, or use --quality fast"):
        fxfuse.compile([a, a], args, quality="best", groups="full", repair=True, calib=_images(8, 0))
    with pytest.raises(StageError, match="random inputs score nothing"):
        fxfuse.compile([a, a], args, quality="best", calib=16)
    with pytest.raises(StageError, match="give calibration inputs"):
        fxfuse.compile([a, a], args, quality="best")


def test_best_is_deterministic_and_keeps_the_lowest_score():
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    calib = _images(80, 0)
    one = fxfuse.compile([a, b], args, quality="best", calib=calib)
    two = fxfuse.compile([a, b], args, quality="best", calib=calib)
    for key, value in one.module.state_dict().items():
        assert torch.equal(value, two.module.state_dict()[key]), key
    q = one.report["quality"]
    scored = [c for c in q["candidates"] if c["score"] is not None]
    kept = [c for c in scored if c["kept"]]
    assert len(kept) == 1 and kept[0]["name"] == q["chosen"]
    assert kept[0]["score"] == min(c["score"] for c in scored)
    # the whole search is timed (candidate seconds are rounded to 1 ms each)
    assert one.report["timings"]["total_s"] >= sum(c["seconds"] for c in q["candidates"]) - 0.001 * len(scored)
    assert [c["name"] for c in q["candidates"]][:3] == ["weights, groups perm", "weights, groups full",
                                                        "activations, groups perm"]


def test_the_best_alignment_of_each_group_is_refined_and_the_lower_kept():
    """A permutation alignment that scores as well unrefined can end above the refined orthogonal maps."""
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    vanilla = fxfuse.compile([a, b], args, method="vanilla").module
    x, y = _labelled(a)
    fake = _Fake(good=a, bad=vanilla,
                 bad_when=lambda kw: not (kw.get("groups") == "full" and kw.get("refine") is not None)
                 or kw.get("repair"))
    result = fuse_best(fake, [a, b], args, {"refine": RefineConfig(7, x, y)})
    q = result.report["quality"]
    refined = [kw for kw in fake.calls[:-1] if kw.get("refine") is not None and not kw.get("repair")]
    assert [(kw.get("cost"), kw.get("groups")) for kw in refined] == [("weights", "perm"), ("weights", "full")]
    assert result.module is a and q["chosen"] == "weights, groups full + refine 7"
    # the kept candidate refitted on all 40 labelled samples, with the same options and budget
    refit = fake.calls[-1]
    assert (refit["cost"], refit["groups"], refit.get("repair")) == ("weights", "full", None)
    assert refit["refine"].inputs.shape[0] == 40 and refit["refine"].steps == 7 and refit["calib"].shape[0] == 40
    assert {k: q["refit"][k] for k in ("calib_samples", "refine_samples", "kept")} == \
        {"calib_samples": 40, "refine_samples": 40, "kept": True}
    assert any(n.startswith("quality best: 'weights, groups perm + refine 7' not kept (held-out loss ")
               for n in result.report["notes"])


def test_best_gives_the_kept_options_fitted_on_all_the_samples_bit_for_bit():
    """The held-out samples choose the stages; the weights are the chosen options' on every sample."""
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    calib = _images(40, 0)
    best = fxfuse.compile([a, b], args, quality="best", calib=calib)
    options = best.report["quality"]["options"]
    assert best.report["quality"]["refit"]["kept"]
    again = fxfuse.compile([a, b], args, calib=calib, **options)
    for key, value in best.module.state_dict().items():
        assert torch.equal(value, again.module.state_dict()[key]), key


def test_repair_can_reorder_the_alignments():
    """An alignment that scores worse unrepaired is kept where its repaired result scores lowest."""
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    vanilla = fxfuse.compile([a, b], args, method="vanilla").module
    half = fxfuse.compile([a, b], args).module  # perm, data-free: between the parent and the average
    calib = _images(40, 0)
    scorer = agreement_scorer([a, b], [1.0, 1.0], [((calib[32:],), {})])
    assert scorer.score(a) < scorer.score(half) < scorer.score(vanilla)

    def fused(models, args, **kw):
        fake.calls.append(kw)
        full, repair = kw.get("groups") == "full", kw.get("repair")
        module = a if full and repair else half if not full and not repair else vanilla
        return FusionResult(module, (), {"notes": [], "timings": {"total_s": 0.0}})

    fake = _Fake(None, None, None)
    result = fuse_best(fused, [a, b], args, {"calib": calib})
    q = result.report["quality"]
    assert [c["name"] for c in q["candidates"]][3:] == ["weights, groups perm + repair",
                                                        "weights, groups full + repair"]
    assert q["chosen"] == "weights, groups full + repair" and result.module is a
    assert any(n.startswith("quality best: 'weights, groups perm + repair' not kept (held-out KL ")
               for n in result.report["notes"])
    refit = fake.calls[-1]
    assert (refit["groups"], refit["repair"], refit["calib"].shape[0]) == ("full", True, 40)


def test_a_refit_that_scores_worse_on_the_held_out_samples_is_dropped_and_said():
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    vanilla = fxfuse.compile([a, b], args, method="vanilla").module
    fake = _Fake(good=a, bad=vanilla, bad_when=lambda kw: kw["calib"].shape[0] == 40)  # only the refit is bad
    result = fuse_best(fake, [a, b], args, {"calib": _images(40, 0)})
    q = result.report["quality"]
    assert fake.calls[-1]["calib"].shape[0] == 40 and result.module is a
    assert not q["refit"]["kept"] and q["refit"]["score"] > min(c["score"] for c in q["candidates"])
    assert any(n.startswith("quality best: the refit on all the samples dropped: it scored worse on the held-out "
                            "samples, which it saw (held-out KL ") and n.endswith("kept the fit on the first 80%")
               for n in result.report["notes"])


@pytest.mark.parametrize("helps", [True, False])
def test_unit_scales_are_a_stage_of_their_own(helps):
    """``refine.scales``: every alignment is refined without them first; then the kept refinement learns them
    too (or, where no refinement was kept, each alignment's); they are kept (and refitted with) only where they
    score lower, else dropped and said."""
    a, args = digits.vit(seed=1)
    b, _ = digits.vit(seed=2)
    vanilla = fxfuse.compile([a, b], args, method="vanilla").module
    x, y = _labelled(a)

    def bad(kw):
        refine = kw.get("refine")
        if kw.get("repair") or refine is None or kw.get("groups") != "full":
            return True
        return refine.scales != helps

    fake = _Fake(good=a, bad=vanilla, bad_when=bad)
    result = fuse_best(fake, [a, b], args, {"refine": RefineConfig(5, x, y, scales=True)})
    q = result.report["quality"]
    refined = [kw for kw in fake.calls[:-1] if kw.get("refine") is not None and not kw.get("repair")]
    scaled = [c for c in q["candidates"] if c["options"].get("refine_scales") and not c["options"].get("repair")]
    if helps:  # no refinement kept without scales: each alignment refined with them, the full one kept
        assert [kw["refine"].scales for kw in refined] == [False, False, True, True]
        assert [c["name"] for c in scaled] == ["weights, groups perm + refine 5 + scales",
                                               "weights, groups full + refine 5 + scales"]
        assert q["chosen"] == "weights, groups full + refine 5 + scales" and scaled[1]["kept"]
    else:  # the full refinement kept; the scales on it score worse: dropped
        assert [kw["refine"].scales for kw in refined] == [False, False, True]
        assert [c["name"] for c in scaled] == ["weights, groups full + refine 5 + scales"]
        assert q["chosen"] == "weights, groups full + refine 5" and not scaled[0]["kept"]
        assert any(n.startswith("quality best: stage scales dropped: it made the result worse")
                   for n in result.report["notes"])
    assert fake.calls[-1]["refine"].scales == helps  # the refit keeps what was chosen
    assert result.module is a
