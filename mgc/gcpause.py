"""Pause Python's cyclic garbage collector while mgc builds many small objects.

Importing torch and compiling a recipe allocate hundreds of thousands of objects, and each burst sets
off collections that walk every live object: a tenth of a small merge's CPU time went to them. mgc's
own data has no reference cycles worth collecting at those moments, so the collector is paused and
restored (with one collection) afterwards; it is never left off.
"""
from __future__ import annotations

import gc
from contextlib import contextmanager
from typing import Iterator


@contextmanager
def gc_paused() -> Iterator[None]:
    was_enabled = gc.isenabled()
    gc.disable()
    try:
        yield
    finally:
        if was_enabled:
            gc.enable()
