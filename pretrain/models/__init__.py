"""Model families. Each family module has the same pieces: build, loss, evaluate."""
from __future__ import annotations

from types import ModuleType


def get_family(name: str) -> ModuleType:
    if name == "gpt":
        from pretrain.models import gpt

        return gpt
    raise ValueError(f"unknown model family {name!r} (known: gpt)")
