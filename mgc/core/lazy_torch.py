"""`torch`, imported on first use. The operator modules name torch at the top as usual, but a command that only
reads their schemas (`mgc ops`) never imports it (about a second of start-up)."""
from __future__ import annotations


class _LazyTorch:
    def __getattr__(self, name: str):
        import torch

        return getattr(torch, name)

    def __repr__(self) -> str:
        return "<torch, imported on first use>"


torch = _LazyTorch()
