"""fxfuse: a declarative, graph-based model-fusion compiler.

Trace models with ``torch.export``, propagate permutations with YAML rules,
and move every model's weights into one basis before fusing them.
"""
from .errors import FxfuseError, RuleError, SpecError, StrictError, TraceError, UnsoundError
from .permute import apply_permutations, move_by_group_elements, permute, random_permutations
from .rules import RuleSet, load_rules
from .spaces import Analysis, Space, analyze, analyze_traced
from .trace import TracedModel, trace

__version__ = "0.1.0"
__all__ = [
    "Analysis", "FxfuseError", "RuleError", "RuleSet", "Space", "SpecError", "StrictError", "TraceError",
    "TracedModel", "analyze", "analyze_traced", "apply_permutations", "load_rules", "move_by_group_elements", "permute",
    "random_permutations", "trace", "UnsoundError",
]

from .fuse import FusionError, FusionResult, compile  # noqa: E402

__all__ += ["FusionError", "FusionResult", "compile"]

from .barrier import BarrierResult, barrier  # noqa: E402

__all__ += ["BarrierResult", "barrier"]
