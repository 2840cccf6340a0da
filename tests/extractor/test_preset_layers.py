"""Layer names known without torch (extractor/preset_layers.py) and "did you mean" for every typed name."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

from extractor.models.capture import layer_names
from extractor.models.registry import FAMILIES, MODEL_PRESETS, UnknownPresetError, family_of_preset
from extractor.preset_layers import PRESET_LAYERS, UnknownLayerError, check_preset_layers
from schemas.vocabulary import PRESET_NAMES
from schemas.suggestions import did_you_mean


@pytest.mark.parametrize("preset", PRESET_NAMES)
def test_static_table_equals_the_built_network(preset):
    family = FAMILIES[MODEL_PRESETS[preset]]
    with torch.device("meta"):  # the structure alone: no weights, no memory
        network = family.build(family.presets[preset])
    assert PRESET_LAYERS[preset] == tuple(layer_names(network))


def test_check_preset_layers_suggests_the_close_name():
    check_preset_layers("tiny-random", ["midblock", "model.enc.64x64_conv"])
    check_preset_layers(None, ["anything"])  # a checkpoint: checked once it is read
    with pytest.raises(UnknownLayerError, match=r"unknown layer 'midblok'; did you mean midblock\? valid layers: model\.enc"):
        check_preset_layers("tiny-random", ["midblock", "midblok"])
    with pytest.raises(UnknownLayerError, match=r"'zzz'; valid layers: Conv2d_1a_3x3"):
        check_preset_layers("fid-inception", ["zzz"])
    with pytest.raises(UnknownPresetError, match=r"did you mean tiny-random\?"):
        family_of_preset("tiny-randm")
    assert did_you_mean("EXTRCT", ["extract", "layers"]) == "; did you mean extract?"
    assert did_you_mean("qqq", ["extract"]) == ""


CASES = [
    (["extract", "x.zarr", "-o", "y.zarr", "--preset", "tiny-random", "--layers", "midblok"], "unknown layer 'midblok'; did you mean midblock?"),
    (["generate", "-o", "g.zarr", "--preset", "tiny-random", "--per-class", "1", "--layers", "encoder_botleneck", "--activations-out", "a.zarr"], "did you mean encoder_bottleneck?"),
    (["extract", "x.zarr", "-o", "y.zarr", "--preset", "tiny-rando", "--layers", "midblock"], "invalid choice: 'tiny-rando'; did you mean tiny-random?"),
    (["convert", "npx", "src", "-o", "o.zarr"], "invalid choice: 'npx'; did you mean npz?"),
]


@pytest.mark.parametrize("argv,message", CASES, ids=["layer", "generate-layer", "preset", "subcommand"])
def test_one_line_before_torch(tmp_path, argv, message):
    code = (
        "import sys\nfrom schemas.cli.dispatch import main\n"
        f"code = main({argv!r})\n"
        "assert 'torch' not in sys.modules, 'torch was imported before the error'\n"
        "sys.exit(code)\n"
    )
    done = subprocess.run([sys.executable, "-c", code], cwd=tmp_path, capture_output=True, text=True)
    assert done.returncode == 2, done.stderr
    lines = done.stderr.strip().splitlines()
    assert len(lines) == 1 and message in lines[0], done.stderr


def test_layer_table_of_a_preset_equals_a_real_forward_of_its_network():
    """`imzarr layers --preset` reads the architecture alone (no weights drawn); its rows are those of the built
    network: the same module paths, and the shapes a real forward of one image gives."""
    from extractor import api
    from extractor.models import capture_layers, cached_model, resolve_layer
    from extractor.models.registry import ModelSpec

    table = api.layer_table(preset="tiny-random")
    loaded = cached_model(ModelSpec(preset="tiny-random"))
    assert (table.model, table.trained) == ("tiny-random", False)
    names = [name for name, _, _ in table.rows]
    assert names == list(PRESET_LAYERS["tiny-random"])
    x = torch.zeros(1, 3, 64, 64)
    labels = torch.zeros(1, loaded.label_dim)
    labels[0, 278] = 1
    with torch.no_grad():
        activations, _ = capture_layers(loaded.module, x, torch.tensor([0.5]), labels, names, need_output=False)
    assert table.rows == [(name, resolve_layer(loaded.module, name), tuple(activations[name].shape[1:])) for name in names]
