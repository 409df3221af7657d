"""Recipes: the options of ``compile`` as one frozen, validated object.

One schema, ``OPTIONS`` (a tuple of ``Option`` descriptors), declares every
option once: its name (the YAML key and the ``compile`` keyword), kind,
default, allowed values and help. From it come the ``Recipe`` dataclass, the
YAML reader and writer, and the ``fxfuse compile`` flags. A new option is one
more ``Option`` entry.

    recipe.yaml ─load─▶ Recipe ◀─override─ command-line flags
                          │
                          ├─▶ fxfuse.compile(recipe)        (models loaded from their specs)
                          └─▶ OUT/fxfuse-recipe.yaml        (paths made absolute: reproducible)

Errors are one line naming the file and key: ``recipe.yaml: key 'solver': 'foo'
is not one of exact, sinkhorn``. This module imports neither torch nor numpy.
"""
from __future__ import annotations

import argparse
import dataclasses
import functools
import math
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Callable, Mapping

import yaml

from ..core.errors import FxfuseError
from ..frontend.rules import read_yaml

BEST_REFINE_STEPS = 300  # refinement budget of quality best when labelled data is given without --refine
KINDS = ("str", "path", "paths", "int", "float", "bool", "floats", "strs", "specs")
RECIPE_FILE = "fxfuse-recipe.yaml"
RECIPE_SUFFIXES = (".yaml", ".yml")


class RecipeError(FxfuseError):
    """A recipe (file, command line or Python values) that does not validate; one line."""


@dataclass(frozen=True)
class Option:
    """One option of ``compile``.

    ``kind``: one of ``KINDS`` (``paths``/``strs``/``specs`` are lists, ``floats``
    a list of numbers, written ``W,W,…`` on the command line); ``flag``: the
    command-line flag, ``""`` for the default ``--NAME`` (underscores as dashes),
    ``None`` for none; ``group``: options of one group exclude each other;
    ``check``: returns a complaint about a value of the right kind, or ``None``;
    ``to_compile``: passed to ``fxfuse.compile`` as the keyword of the same name
    (files such as calibration inputs and rules are loaded first).
    """

    name: str
    kind: str
    default: Any
    help: str
    choices: tuple[str, ...] = ()
    flag: str | None = ""
    metavar: str | None = None
    group: str | None = None
    check: Callable[[Any], str | None] | None = None
    to_compile: bool = True

    @property
    def cli_flag(self) -> str | None:
        return "--" + self.name.replace("_", "-") if self.flag == "" else self.flag


def _positive(value) -> str | None:
    return None if value is None or (value > 0 and math.isfinite(value)) else f"must be a positive number, got {value}"


def _at_least_one(value) -> str | None:
    return None if value is None or value >= 1 else f"need at least one sample, got {value}"


OPTIONS: tuple[Option, ...] = (
    Option("models", "specs", (), "two or more model specs of one architecture (widths and depths may differ)",
           flag=None, to_compile=False),
    Option("target", "int", 0, "index of the model whose basis and class the result takes (0 for the first)",
           check=lambda v: None if v >= 0 else f"must be a model's index, 0 or more, got {v}"),
    Option("cost", "str", "weights", "weight matching (no data) or activation correlation (on --calib, else on "
           "random inputs)", choices=("weights", "activations")),
    Option("calib", "path", None, "calibration inputs: a .pt/.safetensors tensor (N, ...)", metavar="FILE",
           group="calibration", to_compile=False),
    Option("calib_random", "int", None, "N random calibration inputs (smoke tests)", metavar="N",
           group="calibration", check=_at_least_one, to_compile=False),
    Option("sample", "int", None, "N token sequences sampled from the parents (causal LMs), for fusing without a "
           "dataset: the calibration inputs, and the data of --refine and --quality best where --data is not given "
           "(labelled by themselves)", metavar="N", group="calibration", check=_at_least_one, to_compile=False),
    Option("sample_length", "int", None, "tokens per --sample sequence (default: the positions the model's config "
           "allows, at most 64)", metavar="L", check=lambda v: None if v >= 2 else f"need at least 2 tokens, got {v}",
           to_compile=False),
    Option("solver", "str", "exact", "hard assignment / exact OT, or soft entropic OT", choices=("exact", "sinkhorn")),
    Option("reg", "float", None, "sinkhorn regularisation on the max-normalised cost (default 0.06)",
           check=_positive),
    Option("weights", "floats", None, "fusion weights, one per model (default uniform)", metavar="W,W,..."),
    Option("pin", "strs", (), "keep a space unpermuted: sID, or PARAM[:AXIS] glob over its member axes (repeatable)",
           metavar="PATTERN"),
    Option("method", "str", "ot", "ot alignment, or plain averaging", choices=("ot", "vanilla")),
    Option("heads", "str", "nested", "inside-head dims matched per head (nested) or shared by all heads (flat)",
           choices=("nested", "flat")),
    Option("depth_cost", "str", "cka", "models of different depth: block-to-block cost of the cross-layer "
           "alignment, 1 - linear CKA of block outputs or the OT cost between their units (default cka)",
           choices=("cka", "ot")),
    Option("groups", "str", "perm", "perm: permutations only; full: fold norm scales into their linear readers, "
           "then move each space by its whole symmetry group (orthogonal residual streams, in-head maps)",
           choices=("perm", "full")),
    Option("untie", "bool", False, "with groups full: untie a tied weight (an LM head) to fold a norm scale into it "
           "(reported)"),
    Option("width_maps", "str", "embedding", "with groups full: a residual stream of another width moves by a "
           "stretched orthonormal embedding (exact into a wider target) or by a hard matching",
           choices=("embedding", "matching")),
    Option("repair", "bool", False, "rescale fused units to the interpolated statistics of the aligned models on "
           "the calibration inputs (needs --calib or --calib-random), folded into the weights"),
    Option("refine", "int", None, "refine the maps for STEPS steps by gradient descent on the loss of the "
           "interpolated model (needs --data); the maps stay exact", metavar="STEPS",
           check=lambda v: None if v >= 1 else f"need at least one step, got {v}", to_compile=False),
    Option("refine_data", "path", None, "labelled data (.pt/.safetensors: inputs, labels) for --refine",
           flag="--data", metavar="FILE", to_compile=False),
    Option("refine_lr", "float", 0.2, "Adam learning rate of the latent maps of --refine", check=_positive,
           to_compile=False),
    Option("refine_batch", "int", 32, "batch size of --refine",
           check=lambda v: None if v >= 1 else f"must be at least 1, got {v}", to_compile=False),
    Option("refine_lr_orthogonal", "float", 0.03, "Adam learning rate of the orthogonal maps of --refine (groups full)",
           check=_positive, to_compile=False),
    Option("refine_orthogonal", "str", "exp", "how --refine learns orthogonal maps (groups full): exp, Q0·exp(A - Aᵀ) "
           "about the data-free map; project, a latent matrix projected to the nearest orthogonal map each step",
           choices=("exp", "project"), to_compile=False),
    Option("refine_condition", "float", None, "--refine learns the maps of spaces whose group is invertible (in-head "
           "value/output dims) over invertible maps of condition number at most K, not orthogonally (needs "
           "--refine-orthogonal exp)", metavar="K", check=lambda v: None if v > 1 else f"need a bound above 1, got {v}",
           to_compile=False),
    Option("refine_scales", "bool", False, "--refine also learns a scale and a shift per output unit of every "
           "linear, convolution and norm that reaches a nonlinearity or a norm, in the fused model only (folded into "
           "its weights; the parents and the maps stay exact)", to_compile=False),
    Option("refine_lr_scales", "float", 0.01, "Adam learning rate of the unit scales of --refine-scales",
           check=_positive, to_compile=False),
    Option("head", "str", None, "how --refine reads the loss (default: from the model class)",
           choices=("classification", "mlm", "causal"), to_compile=False),
    Option("quality", "str", None, "fast: the options as given; best: try groups perm and full, activation matching, "
           "refinement (with --data) and repair (with calibration inputs), each scored on held-out samples, and keep "
           "what helps (default: best when --calib or --data is given and no mode option is set, else fast)",
           choices=("fast", "best")),
    Option("vocab", "str", None, "language models with different tokenizers: match embedding and LM-head rows by "
           "token string (tokenizer.json) into the target's vocabulary or the union of all; the output's tokenizer "
           "follows", choices=("target", "union")),
    Option("dtype", "str", None, "dtype of the fused model (default: the target's); costs and checks run in float32",
           choices=("float32", "bfloat16", "float16"), to_compile=False),
    Option("workers", "int", 1, "collect activation statistics in N local processes (torch.distributed, gloo); "
           "under torchrun the ranks torchrun starts are the workers", metavar="N",
           check=lambda v: None if v >= 1 else f"need at least one, got {v}", to_compile=False),
    Option("device", "str", "cpu", "where activations, similarity products, Procrustes and refinement run: cpu, "
           "cuda (an error where torch sees no GPU) or auto (cuda where there is one); assignments and the "
           "self-check stay on the CPU", choices=("cpu", "cuda", "auto")),
    Option("match", "str", "auto", "how a source's weights find the target's: by their names, or by matching "
           "the two exported graphs (other names, layouts, fused projections: the source is moved into the "
           "target's class and names first, and checked); auto: by graph for a model of another class than the "
           "target, by names otherwise", choices=("auto", "names", "graph")),
    Option("seed", "int", 0, "seed of the descent order and random calibration"),
    Option("rules", "paths", (), "extra rule file (repeatable; later files override earlier and the shipped rules)",
           metavar="FILE", to_compile=False),
    Option("strict", "bool", False, "fail if any op has no rule (default: pin and report)"),
    Option("max_passes", "int", 50, "passes of the weight-matching descent over the spaces", flag=None,
           check=lambda v: None if v >= 1 else f"must be at least 1, got {v}"),
)
BY_NAME: dict[str, Option] = {o.name: o for o in OPTIONS}


# ---------------------------------------------------------------- validation

def _kind_error(option: Option, value) -> str:
    wanted = {"str": "a string", "path": "a file path", "paths": "a list of file paths", "int": "an integer",
              "float": "a number", "bool": "true or false", "floats": "a list of numbers",
              "strs": "a list of strings", "specs": "a list of model specs"}[option.kind]
    return f"expected {wanted}, got {value!r}"


def _convert(option: Option, value) -> Any:
    """``value`` as ``option``'s kind (lists as tuples); raises ``ValueError`` with the complaint."""
    kind = option.kind
    if value is None and option.default is None:
        return None
    if kind in ("str", "path"):
        if isinstance(value, str) and value:
            return value
    elif kind == "int":
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif kind == "float":
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            return float(value)
    elif kind == "bool":
        if isinstance(value, bool):
            return value
    elif kind == "floats":
        if isinstance(value, str):  # the command-line form W,W,...
            try:
                return tuple(float(w) for w in value.split(","))
            except ValueError:
                raise ValueError("expected numbers separated by commas") from None
        if isinstance(value, (list, tuple)) and all(isinstance(w, (int, float)) and not isinstance(w, bool)
                                                    for w in value):
            return tuple(float(w) for w in value)
    elif kind in ("strs", "paths", "specs"):
        if isinstance(value, str) and value:
            return (value,)
        if isinstance(value, (list, tuple)) and all(isinstance(s, str) and s for s in value):
            return tuple(value)
    raise ValueError(_kind_error(option, value))


def validate(values: Mapping[str, Any], where: Callable[[Option, Any], str]) -> dict[str, Any]:
    """Every option of ``values`` converted and checked; ``where(option, value)`` prefixes a complaint."""
    out = {}
    for name, value in values.items():
        option = BY_NAME[name]
        try:
            value = _convert(option, value)
        except ValueError as exc:
            raise RecipeError(f"{where(option, value)}: {exc}") from None
        if option.choices and value is not None and value not in option.choices:
            raise RecipeError(f"{where(option, value)}: {value!r} is not one of {', '.join(option.choices)}")
        complaint = option.check(value) if option.check and value is not None else None
        if complaint:
            raise RecipeError(f"{where(option, value)}: {complaint}")
        out[name] = value
    groups: dict[str, list[str]] = {}
    for name, value in out.items():
        group = BY_NAME[name].group
        if group and value is not None:
            groups.setdefault(group, []).append(name)
    for names in groups.values():
        if len(names) > 1:
            first = BY_NAME[names[0]]
            raise RecipeError(f"{where(first, out[names[0]])}: excludes {', '.join(repr(n) for n in names[1:])}")
    return out


def _python_where(option: Option, _value) -> str:
    return f"Recipe: key '{option.name}'"


def file_where(source: str) -> Callable[[Option, Any], str]:
    return lambda option, _value: f"{source}: key '{option.name}'"


def cli_where(option: Option, value) -> str:
    flag = option.cli_flag or option.name.upper()
    return f"{flag} {value}" if isinstance(value, (str, int, float)) else flag


# ---------------------------------------------------------------- the recipe

class _RecipeMethods:
    """Behaviour of ``Recipe``; its fields come from ``OPTIONS``."""

    def __post_init__(self) -> None:
        values = validate({o.name: getattr(self, o.name) for o in OPTIONS}, _python_where)
        for name, value in values.items():
            object.__setattr__(self, name, value)

    @classmethod
    def from_dict(cls, data: Mapping[str, Any], source: str = "recipe") -> "Recipe":
        """A recipe from a mapping of option names; errors name ``source`` and the key."""
        if not isinstance(data, Mapping):
            raise RecipeError(f"{source}: expected a mapping of options, got {type(data).__name__}")
        unknown = sorted(str(k) for k in data if k not in BY_NAME)
        if unknown:
            raise RecipeError(f"{source}: unknown key '{unknown[0]}' (known: {', '.join(BY_NAME)})")
        return cls(**validate(data, file_where(source)))

    @classmethod
    def load(cls, path: str | Path) -> "Recipe":
        """Read a YAML recipe file."""
        try:
            data, _node = read_yaml(Path(path))
        except OSError as exc:
            raise RecipeError(f"{path}: cannot read: {exc.strerror or exc}") from None
        except ValueError as exc:
            raise RecipeError(f"{path}: {exc}") from None
        return cls.from_dict(data if data is not None else {}, str(path))

    def to_dict(self) -> dict[str, Any]:
        """Every option in schema order, lists as lists (YAML- and JSON-ready)."""
        return {o.name: list(v) if isinstance(v := getattr(self, o.name), tuple) else v for o in OPTIONS}

    def to_yaml(self) -> str:
        return yaml.safe_dump(self.to_dict(), sort_keys=False, default_flow_style=None, width=100)

    def override(self, changes: Mapping[str, Any], where: Callable[[Option, Any], str] = cli_where) -> "Recipe":
        """This recipe with ``changes``; setting one option of a group clears the others."""
        changes = validate(changes, where)
        merged = self.to_dict()
        for name in changes:
            group = BY_NAME[name].group
            for other in OPTIONS:
                if group and other.group == group and other.name not in changes:
                    merged[other.name] = other.default
        merged.update(changes)
        return type(self)(**merged)

    def normalised(self) -> tuple["Recipe", bool]:
        """``(this recipe with fusion weights that sum to 1, whether they had to be rescaled)``.

        Weights are divided by their sum as ``fxfuse.compile`` divides them, so the recipe records the
        weights used; weights summing to 1 (to rounding) are kept as given. Weights that cannot be fused
        (negative, of another count than the models) are left for ``compile`` to refuse.
        """
        w = self.weights
        if w is None or len(w) != len(self.models) or not all(math.isfinite(x) and x >= 0 for x in w) \
                or sum(w) <= 0 or abs(sum(w) - 1.0) <= 1e-9:
            return self, False
        return dataclasses.replace(self, weights=tuple(x / sum(w) for x in w)), True

    def compile_options(self) -> dict[str, Any]:
        """The keywords this recipe gives ``fxfuse.compile`` directly (files are loaded by the caller)."""
        return {o.name: getattr(self, o.name) for o in OPTIONS if o.to_compile}

    def resolved(self) -> "Recipe":
        """Model specs and files with absolute paths where they name existing files, so that the
        recipe reads the same from any directory."""
        return dataclasses.replace(self, models=tuple(resolve_spec(s) for s in self.models),
                                   calib=_absolute(self.calib) if self.calib else None,
                                   rules=tuple(_absolute(r) for r in self.rules),
                                   refine_data=_absolute(self.refine_data) if self.refine_data else None)


def _absolute(path: str) -> str:
    return str(Path(path).resolve()) if Path(path).exists() else path


def resolve_spec(spec: str) -> str:
    """A model spec with absolute paths: ``DIR``, ``model.pt``, ``file.py:factory[@W]``; a
    ``pkg.module:factory`` keeps its module name (its weights file is made absolute)."""
    if Path(spec).exists():
        return _absolute(spec)
    target, at, weights = spec.partition("@")
    module, colon, factory = target.rpartition(":")
    if colon and module.endswith(".py"):
        target = f"{_absolute(module)}:{factory}"
    return target + (at + _absolute(weights) if at else "")


MODE_OPTIONS = ("cost", "groups", "repair", "refine", "method", "solver")  # options whose choice rules out "best"


def settled(recipe: "Recipe") -> "Recipe":
    """``recipe`` with its ``quality`` decided: as given, else ``best`` where calibration inputs (a file or
    ``sample``) or labelled data are given and every mode option is at its default, else ``fast``."""
    if recipe.quality is not None:
        return recipe
    data = bool(recipe.calib or recipe.refine_data or recipe.sample)
    plain = all(getattr(recipe, name) == BY_NAME[name].default for name in MODE_OPTIONS)
    return dataclasses.replace(recipe, quality="best" if data and plain else "fast")


Recipe = dataclasses.make_dataclass(
    "Recipe", [(o.name, Any, dataclasses.field(default=o.default)) for o in OPTIONS],
    bases=(_RecipeMethods,), frozen=True)
Recipe.__module__ = __name__  # pickling and repr find it here
Recipe.__doc__ = ("The options of ``compile``, frozen and validated; fields as in ``fxfuse.recipes.recipe.OPTIONS``:\n"
                  + "\n".join(f"    {o.name}: {o.help}" for o in OPTIONS))


def is_recipe_file(arg: str) -> bool:
    return arg.lower().endswith(RECIPE_SUFFIXES)


# ---------------------------------------------------------------- command line

def add_options(parser: argparse.ArgumentParser, names: tuple[str, ...] | None = None,
                overriding: bool = True) -> None:
    """The flags of the options ``names`` (default: every option with a flag).

    ``overriding``: defaults are left out of the namespace (``argparse.SUPPRESS``):
    ``given(args)`` are then exactly the flags on the command line, which override
    a recipe. Otherwise the namespace holds every option (lists as lists).
    """
    groups: dict[str, Any] = {}
    for o in OPTIONS:
        if o.cli_flag is None or (names is not None and o.name not in names):
            continue
        where = parser
        if o.group:
            if o.group not in groups:
                groups[o.group] = parser.add_mutually_exclusive_group()
            where = groups[o.group]
        default = list(o.default) if isinstance(o.default, tuple) else o.default
        kw: dict[str, Any] = {"dest": o.name, "default": argparse.SUPPRESS if overriding else default, "help": o.help}
        if o.kind == "bool":
            kw["action"] = "store_true"
        else:
            kw["metavar"] = o.metavar
            if o.kind in ("strs", "paths"):
                kw["action"] = "append"
            elif o.kind in ("int", "float"):
                kw["type"] = int if o.kind == "int" else float
            if o.choices:
                kw["choices"] = list(o.choices)
        where.add_argument(o.cli_flag, **kw)


def given(args: argparse.Namespace) -> dict[str, Any]:
    """The options set on the command line (see ``add_options``)."""
    return {o.name: getattr(args, o.name) for o in OPTIONS if o.cli_flag and hasattr(args, o.name)}


# ---------------------------------------------------------------- Python API

def accepts_recipe(compile_fn: Callable) -> Callable:
    """Let ``compile_fn(models, example_args, **options)`` take a ``Recipe``.

    ``compile_fn(recipe)`` loads the recipe's model specs (the target's example
    inputs are used); ``compile_fn(models, args, recipe=recipe)`` takes its
    options for the given modules. An option given both ways is refused.
    ``rules``/``calib`` keywords are taken as the loaded forms of the recipe's files.
    """

    @functools.wraps(compile_fn)
    def compile_with_recipe(models, example_args: tuple = (), *, recipe=None, **keywords):
        if isinstance(models, Recipe):
            models, recipe = None, models
        if recipe is None:
            return compile_fn(models, example_args, **keywords)
        if not isinstance(recipe, Recipe):
            raise RecipeError(f"recipe must be a Recipe, got {type(recipe).__name__}")
        recipe = settled(recipe)
        options = recipe.compile_options()
        both = sorted(set(keywords) & set(options))
        if both:
            raise RecipeError(f"option '{both[0]}' is given both in the recipe and as a keyword")
        if models is None:
            from ..models.io import load_model

            if len(recipe.models) < 2:
                raise RecipeError("Recipe: key 'models': need at least two model specs to fuse")
            loaded = [load_model(spec) for spec in recipe.models]
            models = [m.module for m in loaded]
            target = loaded[recipe.target % len(loaded)] if -len(loaded) <= recipe.target < len(loaded) else loaded[0]
            keywords.setdefault("example_kwargs", target.kwargs)
            keywords.setdefault("model_inputs", [(m.args, m.kwargs) for m in loaded])
            example_args = target.args
            if recipe.vocab is not None:
                keywords.setdefault("vocabularies", recipe.models)  # read from each directory's tokenizer.json
        if "rules" not in keywords:
            from ..frontend.rules import load_rules

            keywords["rules"] = load_rules(recipe.rules)
        if "calib" not in keywords:
            from ..models.data import load_calibration

            keywords["calib"] = load_calibration(recipe.calib) if recipe.calib else recipe.calib_random
        if "refine" not in keywords and recipe.refine is not None:
            keywords["refine"] = refine_config(recipe)
        return compile_fn(models, example_args, **keywords, **options)

    return compile_with_recipe


def refine_config(values, flag: str = "--data", on_step=None):
    """A ``fxfuse.backend.refine.RefineConfig`` from a recipe's (or a namespace's) ``refine``, ``refine_data``,
    ``refine_lr``, ``refine_batch``, ``refine_lr_orthogonal``, ``refine_orthogonal``, ``refine_scales``,
    ``refine_lr_scales``, ``head`` and ``seed``;
    ``None`` without ``refine`` (with quality best and ``refine_data``: ``BEST_REFINE_STEPS`` steps).
    With ``sample`` and no ``refine_data`` the data is empty here: the compile fills in the sampled
    sequences (``fxfuse.models.sampling.labelled_by_themselves``).
    ``flag``: how the labelled data is given, for the messages."""
    steps = values.refine
    sampled = bool(getattr(values, "sample", None)) and not values.refine_data
    if steps is None and (values.refine_data or sampled) and getattr(values, "quality", None) == "best":
        steps = BEST_REFINE_STEPS
    if steps is None:
        if values.refine_data:
            raise RecipeError(f"{flag} is only used with --refine STEPS (or --quality best)")
        if getattr(values, "refine_scales", False):
            raise RecipeError("--refine-scales is only used with --refine STEPS")
        if getattr(values, "refine_condition", None) is not None:
            raise RecipeError("--refine-condition is only used with --refine STEPS")
        return None
    if steps < 1:
        raise RecipeError(f"--refine {steps}: need at least one step")
    if not values.refine_data and not sampled:
        raise RecipeError(f"--refine needs labelled data: pass {flag} FILE (or --sample N)")
    if values.refine_batch < 1 or not values.refine_lr > 0:
        raise RecipeError("--refine-batch must be at least 1 and --refine-lr positive")
    import torch

    from ..models.data import load_labelled
    from ..backend.refine import RefineConfig

    if sampled:  # filled in once drawn (fxfuse.models.sampling.labelled_by_themselves)
        x = y = torch.zeros((0, 0), dtype=torch.long)
    else:
        x, y = load_labelled(values.refine_data)
    return RefineConfig(steps, x, y, head=getattr(values, "head", None), lr=values.refine_lr,
                        batch_size=values.refine_batch, seed=getattr(values, "seed", 0), on_step=on_step,
                        lr_orthogonal=getattr(values, "refine_lr_orthogonal", 0.03),
                        orthogonal=getattr(values, "refine_orthogonal", "exp"),
                        scales=bool(getattr(values, "refine_scales", False)),
                        lr_scales=getattr(values, "refine_lr_scales", 0.01),
                        condition=getattr(values, "refine_condition", None))
