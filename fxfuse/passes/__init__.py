"""The passes of ``fxfuse.compile``, in order, each a function over frozen data returning the next.

    prepare   (inputs.py)    keywords, models, data       ─▶ Options, Inputs
    relayer   (relayer.py)   Inputs                       ─▶ SameDepth   models at the target's depth
    analyse   (analyse.py)   SameDepth                    ─▶ Analysed    trace → canonicalise → spaces
    plan      (planning.py)  Analysed                     ─▶ Planned     one alignment per source model
    refine    (refining.py)  Planned                      ─▶ Planned     optional: maps learnt on labels
    emit      (emitting.py)  Planned                      ─▶ Emitted     weights moved into the target's basis
    check     (check.py)     Emitted                      ─▶ Checked     self-check of exact maps, drift
    average   (average.py)   Checked                      ─▶ Fused       weighted average, optional repair
    report    (report.py)    all of the above             ─▶ dict

A pass reads what earlier passes returned and never changes it; each can be
run and tested alone. The machinery lives in the modules the passes call:
``trace``, ``canonicalize``, ``spaces`` (analysis by ``rules``), ``plan`` and
``solvers``, ``activations``, ``depth``, ``emit``, ``verify``, ``repair``,
``refine``, ``lazy`` (out of core).
"""
from .analyse import Analysed, analyse, canonical_analysis, resolve_pins
from .average import Fused, average
from .check import Checked, check
from .emitting import Emitted, emit
from .inputs import FusionError, Inputs, Options, calibration_batches, prepare
from .planning import Planned, plan
from .refining import refine
from .relayer import DepthPlan, SameDepth, match_depths, relayer
from .report import report

__all__ = ["Analysed", "Checked", "DepthPlan", "Emitted", "Fused", "FusionError", "Inputs", "Options", "Planned", "SameDepth",
           "analyse", "average", "calibration_batches", "canonical_analysis", "check", "emit", "match_depths", "plan",
           "prepare", "refine", "relayer", "report", "resolve_pins"]
