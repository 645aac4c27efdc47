"""mgc, the merge-graph compiler: merge fine-tuned LLMs from a small recipe language."""
from mgc.gcpause import gc_paused

with gc_paused():  # importing torch and the operator schemas builds many objects
    from mgc.core.errors import MgcError
    from mgc.api import compile_recipe, run

__all__ = ["MgcError", "compile_recipe", "run"]
__version__ = "0.1.0"
