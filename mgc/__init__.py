"""mgc, the merge-graph compiler: merge fine-tuned LLMs from a small recipe language.

`compile_recipe` and `run` are imported on first use (PEP 562), so that commands that do not compile
(`mgc fmt`, `mgc ops`, `mgc --version`) do not pay for the compiler; compiling a recipe (`mgc check`, `mgc plan`)
never imports torch, which only running one does (mgc/core/dtypes.py, tests/test_startup.py)."""
from mgc.core.errors import MgcError

__all__ = ["MgcError", "compile_recipe", "run"]
__version__ = "0.1.0"


def __getattr__(name: str):
    if name in ("compile_recipe", "run"):
        from mgc.gcpause import gc_paused

        with gc_paused():  # importing torch and the operator schemas builds many objects
            from mgc import api
        return getattr(api, name)
    raise AttributeError(f"module 'mgc' has no attribute {name!r}")
