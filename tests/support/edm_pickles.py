"""EDM network pickles rebuilt from our modules the way EDM writes them (persistent classes with embedded
source), for the tests that check such pickles load without running their code."""

from __future__ import annotations

import collections
from pathlib import Path

import torch


class PersistentStandIn:
    """Pickles like an EDM persistent-class instance: reduce to the reconstruct function with a meta dict."""

    def __init__(self, meta: dict, reconstruct) -> None:
        self.meta = meta
        self.reconstruct = reconstruct

    def __reduce__(self):
        return (self.reconstruct, (self.meta,))


def edm_style(module: torch.nn.Module, reconstruct, marker: Path, init_kwargs: dict | None) -> object:
    """Rebuild a module tree the way EDM pickles it: persistent classes for ours, torch.nn classes as is."""
    children = collections.OrderedDict(
        (n, edm_style(c, reconstruct, marker, None)) for n, c in module._modules.items()
    )
    if isinstance(module, torch.nn.ModuleDict):
        plain = torch.nn.ModuleDict()
        plain._modules.update(children)  # bypasses type checks: values are persistent stand-ins
        return plain
    state = {k: v for k, v in module.__dict__.items() if k != "_modules"}
    state["_modules"] = children
    if init_kwargs is not None:
        state["_init_args"] = ()
        state["_init_kwargs"] = init_kwargs
    module_src = f"open({str(marker)!r}, 'w').write('embedded code ran')\n"
    meta = dict(type="class", version=6, module_src=module_src, class_name=type(module).__name__, state=state)
    return PersistentStandIn(meta, reconstruct)
