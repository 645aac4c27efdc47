"""mgc, the merge-graph compiler: merge fine-tuned LLMs from a small recipe language."""
from mgc.compiler.errors import MgcError
from mgc.api import compile_recipe, run

__all__ = ["MgcError", "compile_recipe", "run"]
__version__ = "0.1.0"
