"""``fxfuse rules check FILE...`` and ``fxfuse rules list``: validate rule files, list which ops have rules."""
from __future__ import annotations

import json
import sys


def add_parser(sub) -> None:
    """``fxfuse rules``: its two actions, ``check`` and ``list``."""
    p = sub.add_parser("rules", help="check or list propagation rules")
    rsub = p.add_subparsers(dest="rules_command", metavar="ACTION")
    rsub.required = True
    c = rsub.add_parser("check", help="validate rule files")
    c.add_argument("files", nargs="+", metavar="FILE")
    c.set_defaults(func=run_check)
    c = rsub.add_parser("list", help="which ops have rules, of which kind, from which file")
    c.add_argument("--rules", action="append", default=[], metavar="FILE", help="extra rule file (repeatable)")
    c.add_argument("--json", action="store_true", help="print as JSON")
    c.set_defaults(func=run_list)


def run_check(args) -> int:
    from ..core.errors import RuleError
    from ..frontend.rank_check import check_ranks
    from ..frontend.rules import parse_rule_file
    from ..core.schema import unresolved_ops

    for f in args.files:
        rules = parse_rule_file(f)
        ops = sum(len(r.ops) for r in rules)
        for i, r in enumerate(rules):
            typo = [op for op in unresolved_ops(r.ops) if not r.custom]
            if typo:
                raise RuleError(f, i, "op", f"{typo[0]} is not in torch.ops (a misspelt name?); a custom op that is "
                                "registered later needs 'custom: true' in its rule")
            check_ranks(r, f, i)
        unknown = unresolved_ops(op for r in rules for op in r.ops)
        checked = f" ({ops - len(unknown)} checked against their torch schema)" if unknown else ""
        print(f"ok: {f}: {len(rules)} rules for {ops} ops{checked}")
        if unknown:
            print(f"  not in torch.ops here, so unchecked: {', '.join(unknown)}")
    return 0


def run_list(args) -> int:
    from ..frontend.rules import load_rules

    ruleset = load_rules(args.rules)
    rows = sorted((op, r.kind, r.source) for op, r in ruleset.rules.items())
    if args.json:
        json.dump([{"op": o, "kind": k, "source": s} for o, k, s in rows], sys.stdout, indent=1)
        sys.stdout.write("\n")
        return 0
    width = max(len(o) for o, _, _ in rows)
    for op, kind, source in rows:
        print(f"{op:<{width}}  {kind:<11} {source}")
    print(f"{len(rows)} ops from {len(ruleset.files)} files")
    return 0
