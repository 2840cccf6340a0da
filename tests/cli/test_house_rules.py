"""The house's import rules, read from the code: who may import whom.

- `schemas` imports nothing of ours; `converter` and `extractor` import `schemas` only, never each other.
- The command-line modules (each package's `cli.py` and `__main__.py`, and `schemas/cli/`) are the front door:
  no library module imports one of them, and they reach the library through the packages' APIs only
  (`converter.api`, `extractor.api`, `schemas.api`) — so every rule lives in the library, where the Python API
  applies it too.
"""

from __future__ import annotations

import ast
from pathlib import Path

import pytest

from tests.support.locations import REPO

PACKAGES = ("converter", "extractor", "schemas")
APIS = {"converter.api", "extractor.api", "schemas.api"}


def module_name(path: Path) -> str:
    parts = path.relative_to(REPO).with_suffix("").parts
    return ".".join(parts[:-1] if parts[-1] == "__init__" else parts)


def is_cli(module: str) -> bool:
    package, _, rest = module.partition(".")
    return rest in ("cli", "__main__") or module == "schemas.cli" or module.startswith("schemas.cli.")


def our_imports(path: Path) -> set[str]:
    """Every module of ours that `path` imports (absolute imports; the packages use no relative ones)."""
    found = set()
    for node in ast.walk(ast.parse(path.read_text(encoding="utf-8"))):
        if isinstance(node, ast.Import):
            names = [alias.name for alias in node.names]
        elif isinstance(node, ast.ImportFrom) and node.module and node.level == 0:
            names = [node.module] + [f"{node.module}.{alias.name}" for alias in node.names]
        else:
            continue
        found.update(n for n in names if n.split(".")[0] in PACKAGES)
    return found


def modules() -> dict[str, set[str]]:
    return {module_name(p): our_imports(p) for package in PACKAGES for p in sorted((REPO / package).rglob("*.py"))}


def known(name: str, table: dict[str, set[str]]) -> str:
    """The module an imported name belongs to (`a.b.func` → `a.b`)."""
    while name not in table and "." in name:
        name = name.rsplit(".", 1)[0]
    return name


@pytest.fixture(scope="module")
def table() -> dict[str, set[str]]:
    return modules()


def test_schemas_imports_nothing_of_ours_and_the_two_packages_never_meet(table):
    bad = []
    for module, imports in table.items():
        package = module.split(".")[0]
        for name in imports:
            other = name.split(".")[0]
            if package == "schemas" and other != "schemas":
                bad.append(f"{module} imports {name}")
            if {package, other} == {"converter", "extractor"}:
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)


def test_no_library_module_imports_a_command_line_module(table):
    bad = [f"{module} imports {name}" for module, imports in table.items() if not is_cli(module)
           for name in imports if is_cli(known(name, table))]
    assert not bad, "\n".join(bad)


def test_command_line_modules_reach_the_library_only_through_the_apis(table):
    bad = []
    for module, imports in table.items():
        if not is_cli(module):
            continue
        for name in imports:
            target = known(name, table)
            if not (is_cli(target) or target in APIS or target in PACKAGES):
                bad.append(f"{module} imports {name}")
    assert not bad, "\n".join(bad)


@pytest.mark.parametrize("package", PACKAGES)
def test_public_names_stay_what_they_are_once_every_module_is_imported(package):
    """A submodule named like a public function (`extractor/generate.py` beside `extractor.generate`) would replace
    the function on the package as soon as anything imports the submodule."""
    import importlib

    top = importlib.import_module(package)
    public = {name: getattr(top, name) for name in getattr(top, "__all__", ())}
    for path in sorted((REPO / package).rglob("*.py")):
        importlib.import_module(module_name(path))
    for name in public:
        assert callable(getattr(top, name)) and not isinstance(getattr(top, name), type(top)), f"{package}.{name}"
