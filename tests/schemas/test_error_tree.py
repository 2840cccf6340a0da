"""One error tree: every exception class converter, extractor and schemas define derives from a root in
schemas/errors.py, and its exit code is the one README's table gives that root."""

import importlib
import inspect
import pkgutil
import re

import pytest

import schemas.errors
from tests.support.locations import REPO

PACKAGES = ("converter", "extractor", "schemas")
# Exceptions that never reach a user, each with why it may stand outside the tree.
ALLOWED_OUTSIDE_THE_TREE = {
    "extractor.models.capture._StopForward": "control flow: a hook raises it once every requested layer ran, "
    "and capture_layers catches it in the same call to skip the rest of the network",
}


def readme_exit_codes() -> dict[str, int]:
    """{root class name: exit code} from the README's table `| exit code | meaning | root class |`."""
    text = (REPO / "README.md").read_text(encoding="utf-8")
    rows = re.findall(r"^\|\s*(\d+)\s*\|[^|\n]*\|\s*`(\w+)`\s*\|\s*$", text, flags=re.M)
    return {name: int(code) for code, name in rows}


def defined_exception_classes() -> list[type[BaseException]]:
    """Every exception class defined (not just imported) in a module of the three packages."""
    found = {}
    for package_name in PACKAGES:
        package = importlib.import_module(package_name)
        names = [package_name] + [m.name for m in pkgutil.walk_packages(package.__path__, f"{package_name}.")]
        for name in names:
            if name.rsplit(".", 1)[-1] == "__main__":  # running it runs a command
                continue
            module = importlib.import_module(name)
            for _, value in inspect.getmembers(module, inspect.isclass):
                if issubclass(value, BaseException) and value.__module__ == name:
                    found[f"{name}.{value.__qualname__}"] = value
    return [found[key] for key in sorted(found)]


EXIT_CODES = readme_exit_codes()
CLASSES = defined_exception_classes()


def test_readme_table_names_the_roots_with_their_exit_codes():
    assert EXIT_CODES == {"ImzarrError": 2, "RunFailedError": 1, "RunInterruptedError": 130}
    for name, code in EXIT_CODES.items():
        assert getattr(schemas.errors, name).exit_code == code, name


def test_the_packages_define_many_exception_classes():
    # Guards the walk itself: a broken import walk would find none and pass every check below.
    assert len(CLASSES) > 50
    names = {f"{c.__module__}.{c.__qualname__}" for c in CLASSES}
    assert {"extractor.integrity.IntegrityError", "schemas.store_integrity.DamagedStoreError", *ALLOWED_OUTSIDE_THE_TREE} <= names


@pytest.mark.parametrize("cls", CLASSES, ids=lambda c: f"{c.__module__}.{c.__qualname__}")
def test_every_exception_derives_from_a_root_and_exits_with_its_code(cls):
    qualified = f"{cls.__module__}.{cls.__qualname__}"
    if qualified in ALLOWED_OUTSIDE_THE_TREE:
        assert not issubclass(cls, schemas.errors.ImzarrError)
        return
    roots = [base.__name__ for base in cls.__mro__ if base.__module__ == "schemas.errors" and base.__name__ in EXIT_CODES]
    assert roots, f"{qualified} derives from no root of schemas/errors.py ({', '.join(EXIT_CODES)})"
    assert cls.exit_code == EXIT_CODES[roots[0]], f"{qualified}: exit code {cls.exit_code}, its root {roots[0]} says {EXIT_CODES[roots[0]]}"


def test_integrity_failures_are_failed_runs():
    """NaN/Inf in the values or a shard left unwritten is a run that failed (exit 1), not bad input."""
    from extractor.integrity import IntegrityError

    assert issubclass(IntegrityError, schemas.errors.RunFailedError)
    assert IntegrityError("x").exit_code == EXIT_CODES["RunFailedError"] == 1


def test_ctrl_c_exits_with_the_interrupted_roots_code(capsys):
    from schemas.cli.running import run_command

    def interrupted():
        raise KeyboardInterrupt

    assert run_command("imzarr test", interrupted) == EXIT_CODES["RunInterruptedError"] == 130
    assert capsys.readouterr().err == "imzarr test: interrupted; re-run the same command to resume\n"


def test_ctrl_c_before_the_command_runs_is_the_same_line(capsys):
    """Ctrl-C while a command still imports and parses (before run_command is in charge): one line, exit 130,
    not an import traceback."""
    from schemas.cli.running import run_main

    def still_importing() -> int:
        raise KeyboardInterrupt

    import gc

    try:
        with pytest.raises(SystemExit) as exited:
            run_main("imzarr", still_importing)
    finally:
        gc.unfreeze()  # exit_process froze this test process's objects before exiting
    assert exited.value.code == 130
    assert capsys.readouterr().err == "imzarr: interrupted; re-run the same command to resume\n"
