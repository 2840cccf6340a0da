"""Image store → network → labeled activation store. From Python: `extract` (to a store), `generate` (samples to
an image store), `features` (an in-memory batch to an xr.Dataset) and `report_site` (a compare report as a static
web site); `extractor.image_dataset.ImageStoreDataset` for PyTorch. Importing the package also gives every xarray
Dataset the `ds.imzarr` accessor (extractor/accessor.py)."""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import importlib.util
import sys
from typing import Any

__all__ = ["extract", "features", "generate", "report_site"]


def __getattr__(name: str) -> Any:
    # Imported on first use: `import extractor` (and every `imzarr` command) stays free of torch.
    if name in __all__:
        from extractor import api

        return getattr(api, name)
    raise AttributeError(f"module 'extractor' has no attribute {name!r}")


def _register_accessor() -> None:
    accessor = sys.modules.get("extractor.accessor")
    if accessor is not None and not hasattr(accessor, "register"):
        return  # xarray was first imported by extractor.accessor itself, still loading: it registers when done
    from extractor.accessor import register

    register()


class _RegisterAfterXarray(importlib.abc.MetaPathFinder):
    """Registers `ds.imzarr` right after xarray is first imported: `import extractor` itself must not import
    xarray (about 1 s), or every `imzarr` command, most of which never touch xarray, would start that much later."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> importlib.machinery.ModuleSpec | None:
        if name != "xarray":
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)  # the other finders, as the import would have asked them
        if spec is None or spec.loader is None or not hasattr(spec.loader, "exec_module"):
            return spec
        run_module = spec.loader.exec_module

        def exec_module(module: Any) -> None:
            run_module(module)
            _register_accessor()

        spec.loader.exec_module = exec_module  # this spec's own loader object, made for this import only
        return spec


if "xarray" in sys.modules:
    _register_accessor()
elif not any(isinstance(finder, _RegisterAfterXarray) for finder in sys.meta_path):
    sys.meta_path.insert(0, _RegisterAfterXarray())
