"""`torch`, imported on first use. The operator modules name torch at the top as usual, but a command that only
reads their schemas (`mgc ops`) or compiles a recipe (`mgc check`, `mgc plan`) never imports it (about a second
of start-up)."""
from __future__ import annotations

import importlib


class LazyModule:
    """A module imported when one of its attributes is first read."""

    def __init__(self, name: str):
        self._name, self._module = name, None

    def __getattr__(self, attr: str):
        if self._module is None:
            self._module = importlib.import_module(self._name)
        return getattr(self._module, attr)

    def __repr__(self) -> str:
        return f"<{self._name}, imported on first use>"


torch = LazyModule("torch")
