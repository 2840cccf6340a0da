"""The one `imzarr` command tree: help, version, usage lines, defaults, suggestions, exit codes, one-line errors."""

from __future__ import annotations

import argparse
import subprocess
import sys
from importlib.metadata import version

import pytest

from schemas.cli.dispatch import build_parser, main
from tests.support.commands import run_imzarr



def _leaf_parsers(parser: argparse.ArgumentParser, path: tuple[str, ...] = ()):
    """(command path, parser) of every command that runs something."""
    subs = [a for a in parser._actions if isinstance(a, argparse._SubParsersAction)]  # test-only introspection
    if not subs:
        yield path, parser
        return
    for name, child in subs[0].choices.items():
        yield from _leaf_parsers(child, (*path, name))


def test_help_lists_every_command_and_version(capsys):
    assert main(["--help"]) == 0
    out = capsys.readouterr().out
    for command in ("convert", "sample", "extract", "layers", "generate", "compare", "stats", "report", "show", "info"):
        assert f"    {command} " in out
    assert main(["--version"]) == 0
    assert capsys.readouterr().out.strip() == f"imzarr {version('imzarr')}"


@pytest.mark.parametrize(
    "argv, usage",
    [
        (["convert", "npz", "--help"], "usage: imzarr convert npz"),
        (["convert", "jpeg", "--help"], "usage: imzarr convert jpeg"),
        (["extract", "--help"], "usage: imzarr extract"),
        (["sample", "--help"], "usage: imzarr sample"),
        (["info", "--help"], "usage: imzarr info"),
    ],
)
def test_usage_lines_name_the_whole_command(capsys, argv, usage):
    assert main(argv) == 0
    assert capsys.readouterr().out.startswith(usage)


def test_every_option_says_its_default():
    parser, _ = build_parser()
    missing = []
    for path, leaf in _leaf_parsers(parser):
        one_of_required = {a for g in leaf._mutually_exclusive_groups if g.required for a in g._group_actions}
        for action in leaf._actions:
            if action in one_of_required:
                continue
            if not action.option_strings or action.help == argparse.SUPPRESS or isinstance(action, argparse._HelpAction):
                continue
            flag = isinstance(action, (argparse._StoreTrueAction,))
            text = leaf.formatter_class(leaf.prog)._get_help_string(action) or ""
            if not action.help:
                missing.append(f"{' '.join(path)} {action.option_strings[0]}: no help")
            elif not (flag or action.required or "default" in text.lower()):
                missing.append(f"{' '.join(path)} {action.option_strings[0]}")
    assert not missing, missing


def test_unknown_command_suggests_the_closest(capsys):
    assert main(["extrct"]) == 2
    assert "did you mean extract" in capsys.readouterr().err


@pytest.mark.parametrize(
    "args, fragment",
    [
        (["convert", "npz", "x", "-o", "o.zarr", "--shard-size", "-4"], "--shard-size"),
        (["convert", "npz", "x", "-o", "o.zarr", "--inner-chunk", "0"], "--inner-chunk"),
        (["extract", "s.zarr", "-o", "o.zarr", "--layers", "midblock", "--preset", "tiny-random", "--batch-size", "0"], "--batch-size"),
        (["extract", "s.zarr", "-o", "o.zarr", "--layers", "midblock", "--preset", "tiny-random", "--pool", "median"], "--pool"),
        (["show", "s.zarr", "--per-class", "0"], "--per-class"),
    ],
)
def test_bad_option_values_are_refused_before_anything_exists(tmp_path, args, fragment):
    proc = run_imzarr(*args, cwd=tmp_path)
    assert proc.returncode == 2 and fragment in proc.stderr and "Traceback" not in proc.stderr
    assert list(tmp_path.iterdir()) == []


def test_fp16_on_cpu_is_refused_before_the_store_exists(tmp_path):
    proc = run_imzarr("extract", "in.zarr", "-o", "o.zarr", "--layers", "midblock", "--preset", "tiny-random", "--device", "cpu", "--compute-dtype", "fp16", cwd=tmp_path)
    lines = proc.stderr.strip().splitlines()
    assert proc.returncode == 2 and len(lines) == 1 and lines[0].startswith("imzarr extract: error:") and "CUDA" in lines[0]
    assert list(tmp_path.iterdir()) == []


def test_memory_url_refused_from_the_command_line(tmp_path):
    proc = run_imzarr("extract", "in.zarr", "-o", "memory://x/o.zarr", "--layers", "midblock", "--preset", "tiny-random", cwd=tmp_path)
    assert proc.returncode == 2 and "memory://" in proc.stderr and len(proc.stderr.strip().splitlines()) == 1


def test_closed_pipe_is_not_an_error():
    """`imzarr layers … | head -2`: the reader leaves early; no BrokenPipeError traceback."""
    proc = subprocess.run(f"{sys.executable} -m schemas layers --preset tiny-random | head -2", shell=True, capture_output=True, text=True)
    assert len(proc.stdout.splitlines()) == 2
    assert "Traceback" not in proc.stderr and "BrokenPipe" not in proc.stderr


def test_debug_shows_the_traceback_of_an_unexpected_error(tmp_path):
    (tmp_path / "f.zarr").mkdir()
    (tmp_path / "f.zarr" / "zarr.json").write_text("{ not json")
    quiet = run_imzarr("info", str(tmp_path / "f.zarr"))
    assert quiet.returncode == 2 and len(quiet.stderr.strip().splitlines()) == 1 and "Traceback" not in quiet.stderr
    loud = run_imzarr("info", str(tmp_path / "f.zarr"), "--debug")
    assert loud.returncode != 0 and "Traceback" in loud.stderr


def test_command_line_vocabulary_is_the_models_own():
    """The torch-free words the parsers offer are exactly what the model code accepts."""
    from extractor.models.edm import TORCH_COMPUTE_DTYPES
    from extractor.models.registry import FAMILIES, MODEL_PRESETS
    from schemas.vocabulary import AUTO_COMPUTE_DTYPE, COMPUTE_DTYPE_NAMES, DIFFUSION_PRESET_NAMES, FEATURE_PRESET_NAMES, PRESET_NAMES

    assert PRESET_NAMES == tuple(MODEL_PRESETS)
    assert set(FEATURE_PRESET_NAMES) == {name for name, family in MODEL_PRESETS.items() if FAMILIES[family].kind == "feature"}
    assert set(DIFFUSION_PRESET_NAMES) == {name for name, family in MODEL_PRESETS.items() if FAMILIES[family].kind == "diffusion"}
    assert set(COMPUTE_DTYPE_NAMES) - {AUTO_COMPUTE_DTYPE} == set(TORCH_COMPUTE_DTYPES)


def test_building_the_command_tree_does_not_import_torch():
    code = "import sys; from schemas.cli.dispatch import build_parser; build_parser(); print('torch' in sys.modules)"
    assert subprocess.run([sys.executable, "-c", code], capture_output=True, text=True).stdout.strip() == "False"
