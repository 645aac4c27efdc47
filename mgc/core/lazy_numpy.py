"""`numpy`, imported on first use: the compiler needs it only where a save aligns vocabularies
(compiler/vocab.py, vocab_lower.py), so `mgc check` and `mgc plan` of other recipes do not pay for it."""
from __future__ import annotations

from mgc.core.lazy_torch import LazyModule

np = LazyModule("numpy")
