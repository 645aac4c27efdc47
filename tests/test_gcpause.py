"""The garbage collector is paused while mgc compiles, and always left as it was found."""
import gc
from pathlib import Path

import pytest

from mgc.api import compile_recipe
from mgc.core.errors import MgcError
from mgc.gcpause import gc_paused

ROOT = Path(__file__).resolve().parents[1]


@pytest.mark.parametrize("enabled", [True, False])
def test_compiling_leaves_the_collector_as_it_was(enabled, monkeypatch):
    monkeypatch.chdir(ROOT)
    (gc.enable if enabled else gc.disable)()
    try:
        seen = []
        import mgc.api as api

        real = api.lower
        monkeypatch.setattr(api, "lower", lambda program: (seen.append(gc.isenabled()), real(program))[1])
        compile_recipe(ROOT / "examples" / "quickstart.merge")
        assert seen == [False]  # paused while lowering
        assert gc.isenabled() is enabled
    finally:
        gc.enable()


def test_the_collector_comes_back_after_an_error():
    assert gc.isenabled()
    with pytest.raises(MgcError):
        compile_recipe("bad.merge", text="x = model(\n")
    assert gc.isenabled()
    with pytest.raises(ValueError), gc_paused():
        raise ValueError
    assert gc.isenabled()
