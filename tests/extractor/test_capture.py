"""Layer names, aliases, shape description and hook-based capture with early stop and pooling."""

from __future__ import annotations


import pytest
import torch

from extractor.models import (
    PRESETS,
    EDMPrecond,
    InvalidSigmaError,
    LayerCapture,
    UnknownLayerError,
    build_preset,
    capture_layers,
    describe_layers,
    layer_names,
    resolve_layer,
)




@pytest.fixture(scope="module")
def model(edm_reference: dict) -> EDMPrecond:
    net = EDMPrecond(**edm_reference["config"]).eval()
    net.load_state_dict(edm_reference["state_dict"])
    return net


def _no_hooks(net: EDMPrecond) -> bool:
    return all(not m._forward_hooks for m in net.modules())


def test_layer_names_in_execution_order_plus_aliases(edm_reference: dict, model: EDMPrecond) -> None:
    assert layer_names(model) == list(edm_reference["module_order"]) + ["encoder_bottleneck", "midblock"]


def test_aliases_resolve(model: EDMPrecond) -> None:
    assert resolve_layer(model, "encoder_bottleneck") == "model.enc.8x8_block0"
    assert resolve_layer(model, "midblock") == "model.dec.8x8_in0"
    assert resolve_layer(model, "model.dec.16x16_up") == "model.dec.16x16_up"
    with torch.device("meta"):
        big = EDMPrecond(**PRESETS["dmd2-imagenet64"])
    assert resolve_layer(big, "encoder_bottleneck") == "model.enc.8x8_block2"
    assert resolve_layer(big, "midblock") == "model.dec.8x8_in0"
    assert len(layer_names(big)) == 16 + 21 + 2


def test_unknown_layer_lists_valid_names(model: EDMPrecond) -> None:
    with pytest.raises(UnknownLayerError) as info:
        resolve_layer(model, "model.enc.8x8_block7")
    assert isinstance(info.value, KeyError) and isinstance(info.value, ValueError)
    message = str(info.value)
    assert "model.enc.8x8_block7" in message
    assert "model.dec.32x32_block1" in message and "encoder_bottleneck" in message and "midblock" in message
    with pytest.raises(UnknownLayerError):
        capture_layers(model, torch.zeros(1, 3, 32, 32), 1.0, None, ["model.out_conv"])


def test_describe_layers_matches_real_shapes(edm_reference: dict, model: EDMPrecond) -> None:
    described = describe_layers(model, batch=4)
    assert [name for name, _ in described] == layer_names(model)
    shapes = dict(described)
    for path, act in edm_reference["activations"].items():
        assert shapes[path] == tuple(act.shape), path
    assert shapes["encoder_bottleneck"] == (4, 64, 8, 8)
    assert shapes["midblock"] == (4, 64, 8, 8)
    tiny = dict(describe_layers(build_preset("tiny-random")))
    assert tiny["model.enc.64x64_conv"] == (1, 32, 64, 64)
    assert tiny["encoder_bottleneck"] == (1, 64, 16, 16)


def test_early_stop_gives_same_activations_and_skips_decoder(edm_reference: dict, model: EDMPrecond) -> None:
    decoder_calls: list[str] = []
    handles = [
        block.register_forward_hook(lambda *_a, n=n: decoder_calls.append(n)) for n, block in model.model.dec.items()
    ]
    handles.append(model.model.out_conv.register_forward_hook(lambda *_a: decoder_calls.append("out_conv")))
    try:
        layers = ["model.enc.16x16_block0", "encoder_bottleneck", "model.enc.32x32_conv"]
        with torch.no_grad():
            acts, out = capture_layers(model, edm_reference["x"], edm_reference["sigma"], edm_reference["class_labels"], layers)
    finally:
        for h in handles:
            h.remove()
    assert out is None
    assert decoder_calls == []
    assert list(acts) == layers
    bottleneck = edm_reference["activations"]["model.enc.8x8_block0"]
    torch.testing.assert_close(acts["encoder_bottleneck"], bottleneck, rtol=1e-4, atol=1e-5)
    for name in ("model.enc.16x16_block0", "model.enc.32x32_conv"):
        torch.testing.assert_close(acts[name], edm_reference["activations"][name], rtol=1e-4, atol=1e-5)
    assert _no_hooks(model)


def test_capture_with_output_runs_everything(edm_reference: dict, model: EDMPrecond) -> None:
    with torch.no_grad():
        acts, out = capture_layers(
            model, edm_reference["x"], edm_reference["sigma"], edm_reference["class_labels"], ["midblock", "model.dec.8x8_in0", "encoder_bottleneck"],
            need_output=True,
        )
        full = model(edm_reference["x"], edm_reference["sigma"], edm_reference["class_labels"])
    torch.testing.assert_close(out, full, rtol=0, atol=0)
    torch.testing.assert_close(out, edm_reference["out"], rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(acts["midblock"], edm_reference["activations"]["model.dec.8x8_in0"], rtol=1e-4, atol=1e-5)
    assert acts["midblock"] is acts["model.dec.8x8_in0"]
    assert _no_hooks(model)


def test_decoder_layers_captured_with_early_stop(edm_reference: dict, model: EDMPrecond) -> None:
    with torch.no_grad():
        acts, out = capture_layers(model, edm_reference["x"], edm_reference["sigma"], edm_reference["class_labels"], ["model.dec.16x16_block1"])
    assert out is None
    torch.testing.assert_close(
        acts["model.dec.16x16_block1"], edm_reference["activations"]["model.dec.16x16_block1"], rtol=1e-4, atol=1e-5
    )


@pytest.mark.parametrize("pool", ["mean", "max"])
def test_pooled_capture_equals_pooled_full_map(edm_reference: dict, model: EDMPrecond, pool: str) -> None:
    layers = ["model.enc.32x32_block0", "midblock", "model.dec.32x32_block1"]
    with torch.no_grad():
        pooled, _ = capture_layers(model, edm_reference["x"], edm_reference["sigma"], edm_reference["class_labels"], layers, pool=pool)
        maps, _ = capture_layers(model, edm_reference["x"], edm_reference["sigma"], edm_reference["class_labels"], layers, pool="none")
    for name in layers:
        full = maps[name]
        want = full.mean(dim=(2, 3)) if pool == "mean" else full.amax(dim=(2, 3))
        assert pooled[name].shape == full.shape[:2]
        assert pooled[name].dtype == torch.float32
        torch.testing.assert_close(pooled[name], want, rtol=1e-6, atol=1e-6)


def test_hooks_removed_when_forward_fails(model: EDMPrecond) -> None:
    with pytest.raises(InvalidSigmaError):
        capture_layers(model, torch.zeros(1, 3, 32, 32), 0.0, None, ["midblock"])
    assert _no_hooks(model)


def test_bad_arguments(model: EDMPrecond) -> None:
    x = torch.zeros(1, 3, 32, 32)
    with pytest.raises(ValueError, match="pool"):
        capture_layers(model, x, 1.0, None, ["midblock"], pool="median")  # type: ignore[arg-type]
    with pytest.raises(ValueError, match="no layers"):
        capture_layers(model, x, 1.0, None, [])


def test_layer_capture_registers_once_and_serves_every_batch(edm_reference: dict, model: EDMPrecond) -> None:
    """Names resolved once, one hook per module for the capture's life, the reference values on every batch, and
    idle hooks: a plain forward of the module meanwhile is unchanged; closed, nothing is left on the module."""
    ref = edm_reference
    layers = ["midblock", "encoder_bottleneck", "model.enc.8x8_block0"]  # two names for one module
    with torch.no_grad():
        plain = model(ref["x"], ref["sigma"], ref["class_labels"])
        with LayerCapture(model, layers) as capture:
            assert capture.paths == {"midblock": "model.dec.8x8_in0", "encoder_bottleneck": "model.enc.8x8_block0", "model.enc.8x8_block0": "model.enc.8x8_block0"}
            hooked = sorted(name for name, m in model.named_modules() if m._forward_hooks)
            assert hooked == ["model.dec.8x8_in0", "model.enc.8x8_block0"]
            for _ in range(3):
                acts, out = capture.run(ref["x"], ref["sigma"], ref["class_labels"], need_output=True)
                assert list(acts) == layers and sorted(name for name, m in model.named_modules() if m._forward_hooks) == hooked
                for name in layers:
                    torch.testing.assert_close(acts[name], ref["activations"][capture.paths[name]], rtol=1e-4, atol=1e-5)
                torch.testing.assert_close(out, ref["out"], rtol=1e-4, atol=1e-5)
            torch.testing.assert_close(model(ref["x"], ref["sigma"], ref["class_labels"]), plain, rtol=0, atol=0)
    assert _no_hooks(model)
