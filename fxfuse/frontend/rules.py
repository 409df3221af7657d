"""Propagation rules: YAML files validated into immutable ``Rule`` objects.

A rule file is a YAML list of rules (or a mapping with key ``rules``). Each
rule names one or more ops and a *kind*, the mechanism that relates the axes of
the op's inputs and outputs. The default kind, ``einsum``, reads per-argument
axis signatures::

    - op: aten.linear.default
      axes: {input: "... i", weight: "o i", bias: "o", out: "... o"}

See ``rules/README.md`` for the full language.
"""
from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable, Mapping

import yaml

from ..core.errors import RuleError

NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]*$")
OP = re.compile(r"[A-Za-z_][A-Za-z0-9_]*(\.[A-Za-z_][A-Za-z0-9_]*){1,2}$")
RULE_KEYS = {"op", "kind", "axes", "sizes", "pin", "free", "options", "note", "groups", "group", "scale", "means",
             "custom"}


# ---------------------------------------------------------------- signatures


@dataclass(frozen=True)
class Dim:
    """One tensor dimension of a signature: a name, a product group, or ``...``."""

    names: tuple[str, ...]
    group: bool = False

    @property
    def is_ellipsis(self) -> bool:
        return self.names == ("...",)


@dataclass(frozen=True)
class Signature:
    """Axis signature of one tensor, e.g. ``"... (g o) h w"``."""

    text: str
    dims: tuple[Dim, ...]

    @property
    def ellipsis(self) -> int | None:
        for i, d in enumerate(self.dims):
            if d.is_ellipsis:
                return i
        return None

    @property
    def names(self) -> tuple[str, ...]:
        return tuple(n for d in self.dims if not d.is_ellipsis for n in d.names)


def parse_signature(text: str) -> Signature:
    """Parse ``"... (g o) i"``; raises ``ValueError`` with the reason."""
    if not isinstance(text, str):
        raise ValueError(f"signature must be a string, got {type(text).__name__}")
    tokens = re.findall(r"\(|\)|\.\.\.|[^\s()]+", text)
    dims: list[Dim] = []
    group: list[str] | None = None
    for tok in tokens:
        if tok == "(":
            if group is not None:
                raise ValueError(f"nested '(' in {text!r}")
            group = []
        elif tok == ")":
            if not group:
                raise ValueError(f"empty or unopened group in {text!r}")
            dims.append(Dim(tuple(group), group=True))
            group = None
        elif tok == "...":
            if group is not None:
                raise ValueError(f"'...' inside a group in {text!r}")
            dims.append(Dim(("...",)))
        elif NAME.match(tok):
            if group is not None:
                group.append(tok)
            else:
                dims.append(Dim((tok,)))
        else:
            raise ValueError(f"bad axis name {tok!r} in {text!r}")
    if group is not None:
        raise ValueError(f"unclosed '(' in {text!r}")
    if sum(d.is_ellipsis for d in dims) > 1:
        raise ValueError(f"more than one '...' in {text!r}")
    names = [n for d in dims if not d.is_ellipsis for n in d.names]
    dup = {n for n in names if names.count(n) > 1}
    if dup:
        raise ValueError(f"axis {sorted(dup)[0]!r} repeated within {text!r}")
    return Signature(text, tuple(dims))


# ---------------------------------------------------------------- rules


@dataclass(frozen=True)
class Rule:
    """How one op moves permutations between its tensors.

    ``axes`` holds alternatives, each a tuple of ``(argument, Signature)``
    pairs; the first whose ranks fit a node is used.
    """

    ops: tuple[str, ...]
    kind: str
    source: str
    axes: tuple[tuple[tuple[str, Signature], ...], ...] = ()
    sizes: tuple[tuple[str, str | int], ...] = ()
    pin: frozenset[str] = frozenset()
    free: frozenset[str] = frozenset()
    options: tuple[tuple[str, Any], ...] = ()
    note: str = ""
    origin: tuple[str, int] = ("", -1)  # (file path, rule index) for errors found later
    groups: tuple[tuple[str, str], ...] = ()  # per axis name: the maps the op commutes with (default perm)
    group: str | None = None  # for every axis of a Python kind (or 'sum'/'product' for broadcast)
    scale: frozenset[str] = frozenset()  # arguments that scale per channel: larger groups need them uniform
    means: frozenset[str] = frozenset()  # axes the op averages over (a norm): see fxfuse.frontend.groups
    custom: bool = False  # its ops are registered at run time (custom ops): torch.ops may not know them yet

    def option(self, key: str, default: Any = None) -> Any:
        return dict(self.options).get(key, default)


@dataclass(frozen=True)
class RuleSet:
    """Rules keyed by op name (``ns.op.overload`` or ``ns.op`` for every overload)."""

    rules: Mapping[str, Rule] = field(default_factory=dict)
    files: tuple[str, ...] = ()

    def lookup(self, op: str) -> Rule | None:
        rule = self.rules.get(op)
        if rule is None and op.count(".") == 2:
            rule = self.rules.get(op.rsplit(".", 1)[0])
        return rule

    def __len__(self) -> int:
        return len(self.rules)


def shipped_rules_dir() -> Path:
    """The ``rules/`` folder shipped with fxfuse (source tree or installed copy)."""
    here = Path(__file__).resolve().parents[1]  # the package folder (this module is in fxfuse/frontend/)
    for candidate in (here.parent / "rules", here / "shipped_rules"):
        if candidate.is_dir() and any(candidate.glob("*.yaml")):
            return candidate
    raise RuleError(str(here), None, None, "shipped rules folder not found; reinstall fxfuse")


def shipped_rule_files() -> list[Path]:
    return sorted(shipped_rules_dir().glob("*.yaml"))


def load_rules(extra: Iterable[str | Path] = (), shipped: bool = True) -> RuleSet:
    """Load the shipped rules, then each file of ``extra``; later files override earlier."""
    files = (shipped_rule_files() if shipped else []) + [Path(p) for p in extra]
    rules: dict[str, Rule] = {}
    for path in files:
        for rule in parse_rule_file(path):
            for op in rule.ops:
                rules[op] = rule
    return RuleSet(rules, tuple(str(f) for f in files))


class _UniqueKeys(yaml.SafeLoader):
    """YAML's safe loader that refuses a mapping key given twice (YAML would keep the last silently)."""

    def construct_mapping(self, node, deep=False):
        seen: dict[Any, int] = {}
        for key_node, _ in node.value:
            key = self.construct_object(key_node, deep=True)
            try:
                first = seen.setdefault(key, key_node.start_mark.line + 1)
            except TypeError:  # an unhashable key: the constructor below says so
                continue
            if first != key_node.start_mark.line + 1:
                raise yaml.constructor.ConstructorError(
                    None, None, f"key {key!r} given twice (lines {first} and {key_node.start_mark.line + 1})",
                    key_node.start_mark)
        return super().construct_mapping(node, deep)


def read_text(path: Path) -> str:
    """A file's text as UTF-8; raises ``OSError`` or ``ValueError`` (with the byte offset) with the reason."""
    data = path.read_bytes()
    try:
        return data.decode("utf-8")
    except UnicodeDecodeError as exc:
        line = data.count(b"\n", 0, exc.start) + 1
        raise ValueError(f"not UTF-8 text: byte 0x{data[exc.start]:02x} at byte offset {exc.start} (line {line}) "
                         f"is not valid UTF-8") from None


def read_yaml(path: Path) -> tuple[Any, Any]:
    """``(data, node)`` of a UTF-8 YAML file, a key given twice refused; raises ``OSError`` or ``ValueError``
    with a one-line reason (``line N: ...``)."""
    text = read_text(path)
    loader = _UniqueKeys(text)
    try:
        node = loader.get_single_node()
        data = loader.construct_document(node) if node is not None else None
    except yaml.YAMLError as exc:
        raise ValueError(yaml_problem(exc)) from None
    finally:
        loader.dispose()
    return data, node


def parse_rule_file(path: str | Path) -> list[Rule]:
    """Read and validate one YAML rule file; raises ``RuleError`` naming the fault (an op ruled twice too)."""
    path = Path(path)
    try:
        data, node = read_yaml(path)
    except OSError as exc:
        raise RuleError(str(path), None, None, f"cannot read: {exc.strerror or exc}") from None
    except ValueError as exc:
        raise RuleError(str(path), None, None, str(exc)) from None
    if isinstance(data, dict) and set(data) <= {"rules"}:
        data = data.get("rules")
        node = node.value[0][1] if node.value else None
    if data is None:
        return []
    if not isinstance(data, list):
        raise RuleError(str(path), None, None, "expected a list of rules (or a mapping with key 'rules')")
    rules = [_parse_rule(path, i, raw) for i, raw in enumerate(data)]
    lines = [item.start_mark.line + 1 for item in node.value]
    first: dict[str, int] = {}
    for i, rule in enumerate(rules):
        for op in rule.ops:
            j = first.setdefault(op, i)
            if j != i:
                raise RuleError(str(path), i, "op", f"{op} is ruled twice: by rule {j} (line {lines[j]}) and rule {i} "
                                f"(line {lines[i]}); keep one")
    return rules


def yaml_problem(exc: yaml.YAMLError) -> str:
    """A YAML parse error in one line: ``line N: invalid YAML: PROBLEM``."""
    mark = getattr(exc, "problem_mark", None)
    line = f"line {mark.line + 1}: " if mark is not None else ""
    problem = getattr(exc, "problem", None) or str(exc).splitlines()[0]
    return f"{line}invalid YAML: {problem}"


def _parse_rule(path: Path, index: int, raw: Any) -> Rule:
    from .all_kinds import KINDS

    def fail(fieldname: str | None, message: str) -> RuleError:
        return RuleError(str(path), index, fieldname, message)

    if not isinstance(raw, dict):
        raise fail(None, f"a rule must be a mapping, got {type(raw).__name__}")
    unknown = sorted(set(raw) - RULE_KEYS)
    if unknown:
        raise fail(unknown[0], f"unknown key (allowed: {', '.join(sorted(RULE_KEYS))})")
    if "op" not in raw:
        raise fail("op", "missing")
    ops = raw["op"] if isinstance(raw["op"], list) else [raw["op"]]
    if not ops:
        raise fail("op", "empty list")
    for op in ops:
        if not isinstance(op, str) or not OP.match(op):
            raise fail("op", f"{op!r} is not an op name like 'aten.linear.default' or 'mylib.op'")
    kind_name = raw.get("kind", "einsum")
    if kind_name not in KINDS:
        raise fail("kind", f"unknown kind {kind_name!r} (known: {', '.join(sorted(KINDS))})")
    kind = KINDS[kind_name]

    axes: list[tuple[tuple[str, Signature], ...]] = []
    if "axes" in raw:
        if not kind.uses_axes:
            raise fail("axes", f"kind {kind_name!r} takes no axes")
        alternatives = raw["axes"] if isinstance(raw["axes"], list) else [raw["axes"]]
        for alt in alternatives:
            if not isinstance(alt, dict) or not alt:
                raise fail("axes", "expected a mapping from argument name to signature")
            pairs = []
            for arg, text in alt.items():
                if not isinstance(arg, str) or not NAME.match(arg):
                    raise fail("axes", f"bad argument name {arg!r}")
                try:
                    pairs.append((arg, parse_signature(text)))
                except ValueError as exc:
                    raise fail("axes", f"argument '{arg}': {exc}") from None
            axes.append(tuple(pairs))
    elif kind.uses_axes:
        raise fail("axes", f"kind {kind_name!r} needs axes")

    names = {n for alt in axes for _, sig in alt for n in sig.names}
    if any(sig.ellipsis is not None for alt in axes for _, sig in alt):
        names.add("...")
    sizes = raw.get("sizes", {}) or {}
    if not isinstance(sizes, dict):
        raise fail("sizes", "expected a mapping from axis name to an argument name or integer")
    for name, src in sizes.items():
        if name not in names:
            raise fail("sizes", f"axis {name!r} does not appear in axes")
        if not (isinstance(src, int) and src > 0) and not (isinstance(src, str) and NAME.match(src)):
            raise fail("sizes", f"size of {name!r} must be a positive integer or an argument name")
    sets = {}
    for key in ("pin", "free"):
        value = raw.get(key, []) or []
        if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
            raise fail(key, "expected a list of axis names")
        missing = [v for v in value if v not in names]
        if missing:
            raise fail(key, f"axis {missing[0]!r} does not appear in axes")
        sets[key] = frozenset(value)
    both = sets["pin"] & sets["free"]
    if both:
        raise fail("free", f"axis {sorted(both)[0]!r} is both pinned and free")
    options = raw.get("options", {}) or {}
    if not isinstance(options, dict):
        raise fail("options", "expected a mapping")
    bad = sorted(set(options) - set(kind.options))
    if bad:
        allowed = ", ".join(sorted(kind.options)) or "none"
        raise fail("options", f"unknown option {bad[0]!r} for kind {kind_name!r} (allowed: {allowed})")
    want = int if kind_name == "subgraph" else str
    for key, value in options.items():
        if not isinstance(value, want) or isinstance(value, bool):
            what = "an argument index" if want is int else "an argument name"
            raise fail("options", f"option {key!r} must be {what}, got {value!r}")
    note = raw.get("note", "")
    if not isinstance(note, str):
        raise fail("note", "expected a string")
    custom = raw.get("custom", False)
    if not isinstance(custom, bool):
        raise fail("custom", f"expected true or false, got {custom!r}")
    groups, group, scale = _parse_groups(raw, names, kind_name, fail)
    means = raw.get("means", []) or []
    if not isinstance(means, list) or not all(isinstance(v, str) for v in means):
        raise fail("means", "expected a list of axis names")
    for name in means:
        if name not in dict(groups):
            raise fail("means", f"axis {name!r} has no group in 'groups' (only an axis with a larger group "
                                "can be averaged over)")
    rule = Rule(
        ops=tuple(ops), kind=kind_name, source=f"{path.name}:{index}", axes=tuple(axes),
        sizes=tuple(sizes.items()), pin=sets["pin"], free=sets["free"],
        options=tuple(options.items()), note=note, origin=(str(path), index),
        groups=groups, group=group, scale=scale, means=frozenset(means), custom=custom,
    )
    from ..core.schema import check_rule  # reads torch.ops: imported only when a rule file is read

    check_rule(rule, str(path), index)
    return rule


def _parse_groups(raw: dict, names: set[str], kind_name: str, fail):
    """Validate ``groups`` (einsum: ``{axis: group}``), ``group`` (other kinds) and ``scale`` (argument names)."""
    from .groups import BROADCAST_GROUPS, LEVELS

    groups = raw.get("groups", {}) or {}
    if not isinstance(groups, dict):
        raise fail("groups", "expected a mapping from axis name to a group")
    if groups and kind_name != "einsum":
        raise fail("groups", f"kind {kind_name!r} takes 'group', not per-axis 'groups'")
    for name, value in groups.items():
        if name not in names:
            raise fail("groups", f"axis {name!r} does not appear in axes")
        if value not in LEVELS:
            raise fail("groups", f"unknown group {value!r} for axis {name!r} (known: {', '.join(LEVELS)})")
    group = raw.get("group")
    if group is not None:
        if kind_name == "einsum":
            raise fail("group", "an einsum rule gives groups per axis: use 'groups: {axis: group}'")
        allowed = tuple(LEVELS) + (BROADCAST_GROUPS if kind_name in ("broadcast", "elementwise") else ())
        if group not in allowed:
            raise fail("group", f"unknown group {group!r} for kind {kind_name!r} (known: {', '.join(allowed)})")
    scale = raw.get("scale", []) or []
    if not isinstance(scale, list) or not all(isinstance(v, str) and NAME.match(v) for v in scale):
        raise fail("scale", "expected a list of argument names")
    return tuple(groups.items()), group, frozenset(scale)
