"""What a pass returns."""
from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Optional

from ..ir import Graph

if TYPE_CHECKING:
    from .schedule_blocks import Schedule


@dataclass(frozen=True)
class PassResult:
    graph: Graph  # frozen: the input graph itself when the pass changed nothing
    fired: Counter = field(default_factory=Counter)  # rule name -> times it fired
    schedule: Optional["Schedule"] = None  # the order of work, from the scheduling pass
