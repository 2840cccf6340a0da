"""Feature networks (`fid-inception`, `dinov2-*`): agreement with the reference implementations, layouts, loading.

How the fixtures were made (the generator holds reference code, so it is not part of the repository):

- `feature_model_inputs.pt`: two 64×64 uint8 test images (a smooth pattern, 8×8 colour blocks, both with noise)
  and one 320×352 image with fine detail, which both networks downsample (so antialiasing shows).
- Weights: each network's own `random_state_dict(config, seed=0)` (state-dict key i from the seeded rule of
  extractor/models/seeded.py: the project's counter-based noise recipe of (0, i), torch's RNG unused; the
  transforms are in each docstring), drawn in the project's venv, saved, and loaded strictly into the reference
  network; `weights_sha256` pins the draw (tests/extractor/test_seeded_weights.py pins the same hashes as literals).
- `fid_inception_ref.pt`: pytorch-fid 0.3.0 (torchvision 0.29.1, torch 2.14.1): `InceptionV3(output_blocks=
  [0, 1, 2, 3], resize_input=True, normalize_input=True, use_fid_inception=True)` on images / 255, with the
  weight download replaced by the seeded state dict; hooks on its torchvision modules give Conv2d_* / Mixed_*,
  its block outputs give maxpool1 / maxpool2 / pool3, `fid_inception_v3()` on the block-0 input gives the logits.
  `fid64` / `fid192` / `fid768` / `fid2048`: pytorch-fid's `--dims` features as its own code computes them, a
  separate `InceptionV3(output_blocks=[InceptionV3.BLOCK_INDEX_BY_DIM[d]])` per d on images / 255, then fid_score's
  `adaptive_avg_pool2d(pred, output_size=(1, 1))` where pred is larger than 1×1, `squeeze(3).squeeze(2)`.
  `state_dict_shapes` is that network's state-dict layout (the layout of pt_inception-2015-12-05-6726825d.pth).
- `dinov2_ref.pt`: facebookresearch/dinov2's `DinoVisionTransformer` (vision_transformer.py and layers/, no
  xFormers) built as hubconf builds dinov2_vit{s,b,l,g}14 (img_size 518, patch 14, init_values 1.0, block_chunks
  0, no registers, interpolate_offset 0.1, no antialias), fed by EDM2's DINOv2Detector preprocessing
  (resize_mode='torch'). `cls` = forward() (x_norm_clstoken), `patch_mean` = x_norm_patchtokens.mean(1),
  `blocks.N` = get_intermediate_layers(reshape=True, norm=False). ViT-S/14 is full size; ViT-B/L/g use their full
  widths at depth 2 (2 CPU cores). `published_shapes` is every full variant's state-dict layout.

Activations are stored subsampled (every `step`-th value per sample, ≤ 2048 values) to keep fixtures small;
agreement is checked to 1e-4 relative to each layer's largest magnitude.
"""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from extractor.models import (
    FAMILIES,
    MODEL_PRESETS,
    CheckpointError,
    CheckpointMismatchError,
    DinoV2,
    FIDInceptionV3,
    InvalidImageBatchError,
    LoadedModel,
    ModelSpec,
    UnknownLayerError,
    UnknownPresetError,
    capture_layers,
    describe_layers,
    family_of_checkpoint,
    file_sha256,
    layer_names,
    load_model,
    resolve_layer,
    state_dict_sha256,
)
from extractor.models import dinov2, fid_inception
from extractor.models.dinov2 import UnsupportedDinoV2Error
from extractor.models.fid_inception import NotFIDInceptionError
from schemas.errors import ImzarrError

from tests.support.locations import FIXTURES  # noqa: E402
RTOL = 1e-4
DINO_PRESETS = ("dinov2-vits14", "dinov2-vitb14", "dinov2-vitl14", "dinov2-vitg14")
# Published checkpoints (dinov2_vit*14_pretrain.pth): embed dim, depth, heads.
PUBLISHED_DINO = {
    "dinov2-vits14": (384, 12, 6),
    "dinov2-vitb14": (768, 12, 12),
    "dinov2-vitl14": (1024, 24, 16),
    "dinov2-vitg14": (1536, 40, 24),
}


@pytest.fixture(scope="module")
def inputs() -> dict:
    return torch.load(FIXTURES / "feature_model_inputs.pt", weights_only=True)


@pytest.fixture(scope="module")
def fid_ref() -> dict:
    return torch.load(FIXTURES / "fid_inception_ref.pt", weights_only=True)


@pytest.fixture(scope="module")
def dino_ref() -> dict:
    return torch.load(FIXTURES / "dinov2_ref.pt", weights_only=True)


def every_layer(net: torch.nn.Module, images: torch.Tensor) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    """Every named layer of `net` on `images`, and its output."""
    with torch.no_grad():
        return capture_layers(net, images, None, None, layer_names(net), need_output=True)


@pytest.fixture(scope="module")
def fid_loaded() -> LoadedModel:
    return load_model(ModelSpec(preset="fid-inception"))


@pytest.fixture(scope="module")
def fid_net(fid_loaded: LoadedModel) -> FIDInceptionV3:
    return fid_loaded.module


@pytest.fixture(scope="module")
def fid_run(fid_net: FIDInceptionV3, inputs: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return every_layer(fid_net, inputs["images"])


@pytest.fixture(scope="module")
def fid_acts(fid_run: tuple) -> dict[str, torch.Tensor]:
    return fid_run[0]


@pytest.fixture(scope="module")
def vits14_loaded() -> LoadedModel:
    return load_model(ModelSpec(preset="dinov2-vits14"))


@pytest.fixture(scope="module")
def vits14(vits14_loaded: LoadedModel) -> DinoV2:
    return vits14_loaded.module


@pytest.fixture(scope="module")
def vits14_run(vits14: DinoV2, inputs: dict) -> tuple[dict[str, torch.Tensor], torch.Tensor]:
    return every_layer(vits14, inputs["images"])


def _seeded_dinov2(config: dict, seed: int) -> DinoV2:
    net = dinov2.build(config)
    net.load_state_dict(dinov2.random_state_dict(net.config, seed), strict=True)
    return net.eval()


def _assert_matches(ours: torch.Tensor, ref: torch.Tensor, step: int, what: str) -> None:
    got = ours.detach().flatten(1).float()[:, ::step]
    torch.testing.assert_close(got, ref, rtol=RTOL, atol=RTOL * float(ref.abs().max()), msg=what)


def _no_hooks(net: torch.nn.Module) -> bool:
    return all(not m._forward_hooks for m in net.modules())


# ---------------------------------------------------------------------------------------------------------------
# FID Inception against pytorch-fid.


def test_fid_state_dict_layout_is_the_published_one(fid_ref: dict, fid_net: FIDInceptionV3) -> None:
    got = [(key, tuple(t.shape)) for key, t in fid_net.state_dict().items()]
    assert got == [(key, tuple(shape)) for key, shape in fid_ref["state_dict_shapes"]]
    assert dict(got)["fc.weight"] == (1008, 2048)
    assert not any(key.startswith("AuxLogits") for key, _ in got)


def test_fid_seeded_weights_are_the_fixture_weights(fid_ref: dict, fid_net: FIDInceptionV3) -> None:
    assert state_dict_sha256(fid_net.state_dict()) == fid_ref["weights_sha256"]
    drawn = fid_inception.random_state_dict(fid_inception.PRESETS["fid-inception"], fid_ref["seed"])
    assert state_dict_sha256(drawn) == fid_ref["weights_sha256"]


def test_fid_preprocessing_matches_pytorch_fid(fid_ref: dict, fid_net: FIDInceptionV3, inputs: dict) -> None:
    for images, ref in ((inputs["images"], fid_ref), (inputs["large_image"], fid_ref["large_image"])):
        x = fid_net.preprocess(images)
        assert x.shape[-2:] == (299, 299)
        _assert_matches(x, ref["preprocessed"], ref["preprocessed_step"], "preprocessed")


def test_fid_every_layer_matches_pytorch_fid(fid_ref: dict, fid_net: FIDInceptionV3, fid_acts: dict) -> None:
    assert set(fid_ref["layers"]) == set(layer_names(fid_net))
    for name, ref in fid_ref["layers"].items():
        assert tuple(fid_acts[name].shape) == tuple(fid_ref["shapes"][name]), name
        _assert_matches(fid_acts[name], ref, fid_ref["steps"][name], name)
    assert fid_acts["pool3"].shape == (2, 2048)


def test_fid_pytorch_fid_dims_are_its_features(fid_ref: dict, fid_acts: dict) -> None:
    """`fidD` = pytorch-fid's `--dims D` feature: InceptionV3(output_blocks=[BLOCK_INDEX_BY_DIM[D]]) + fid_score's
    adaptive average pooling, computed by pytorch-fid 0.3.0's own code in the fixture."""
    for dims, name in fid_inception.PYTORCH_FID_DIMS.items():
        assert fid_acts[name].shape == (2, dims) and fid_ref["steps"][name] == 1, name
        _assert_matches(fid_acts[name], fid_ref["layers"][name], 1, name)
    torch.testing.assert_close(fid_acts["fid2048"], fid_acts["pool3"], rtol=0, atol=0)
    for name, block_end in (("fid64", "maxpool1"), ("fid192", "maxpool2"), ("fid768", "Mixed_6e")):
        torch.testing.assert_close(fid_acts[name], fid_acts[block_end].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)


def test_fid_downsampled_input_matches_pytorch_fid(fid_ref: dict, fid_net: FIDInceptionV3, inputs: dict) -> None:
    ref = fid_ref["large_image"]
    with torch.no_grad():
        acts, _ = capture_layers(fid_net, inputs["large_image"], None, None, list(ref["layers"]))
    for name, want in ref["layers"].items():
        _assert_matches(acts[name], want, ref["steps"][name], name)


def test_fid_forward_returns_logits(fid_run: tuple) -> None:
    acts, out = fid_run
    torch.testing.assert_close(out, acts["logits"], rtol=0, atol=0)


# ---------------------------------------------------------------------------------------------------------------
# DINOv2 against facebookresearch/dinov2 with EDM2's preprocessing.


@pytest.mark.parametrize("preset", DINO_PRESETS)
def test_dinov2_state_dict_layout_is_the_published_one(dino_ref: dict, preset: str) -> None:
    with torch.device("meta"):
        net = dinov2.build(dinov2.PRESETS[preset])
    got = [(key, tuple(t.shape)) for key, t in net.state_dict().items()]
    assert got == [(key, tuple(shape)) for key, shape in dino_ref["published_shapes"][preset]]
    dim, depth, heads = PUBLISHED_DINO[preset]
    shapes = dict(got)
    assert list(shapes)[:4] == ["cls_token", "pos_embed", "mask_token", "patch_embed.proj.weight"]
    assert shapes["pos_embed"] == (1, 1 + 37 * 37, dim)
    assert shapes["patch_embed.proj.weight"] == (dim, 3, 14, 14)
    assert shapes[f"blocks.{depth - 1}.attn.qkv.weight"] == (3 * dim, dim)
    assert f"blocks.{depth}.norm1.weight" not in shapes
    assert shapes[f"blocks.{depth - 1}.ls2.gamma"] == (dim,) and list(shapes)[-2:] == ["norm.weight", "norm.bias"]
    assert net.blocks[0].attn.num_heads == heads
    if preset == "dinov2-vitg14":
        assert shapes["blocks.0.mlp.w12.weight"] == (2 * 4096, 1536)
        assert shapes["blocks.0.mlp.w3.weight"] == (1536, 4096)
    else:
        assert shapes["blocks.0.mlp.fc1.weight"] == (4 * dim, dim)


def test_dinov2_vits14_matches_reference(dino_ref: dict, inputs: dict, vits14: DinoV2, vits14_run: tuple) -> None:
    ref = dino_ref["variants"]["dinov2-vits14"]
    assert state_dict_sha256(vits14.state_dict()) == ref["weights_sha256"]
    _assert_matches(vits14.preprocess(inputs["images"]), ref["preprocessed"], ref["preprocessed_step"], "input")
    acts, out = vits14_run
    assert set(ref["layers"]) == set(layer_names(vits14))
    for name, want in ref["layers"].items():
        assert tuple(acts[name].shape) == tuple(ref["shapes"][name]), name
        _assert_matches(acts[name], want, ref["steps"][name], name)
    torch.testing.assert_close(out, acts["cls"], rtol=0, atol=0)


@pytest.mark.parametrize("preset", ["dinov2-vitb14", "dinov2-vitl14", "dinov2-vitg14"])
def test_dinov2_wide_variants_match_reference(dino_ref: dict, inputs: dict, preset: str) -> None:
    """Full widths at the fixture's reduced depth; the first test image only (2 CPU cores)."""
    ref = dino_ref["variants"][preset]
    net = _seeded_dinov2({**dinov2.PRESETS[preset], **ref["overrides"]}, dino_ref["seed"])
    assert state_dict_sha256(net.state_dict()) == ref["weights_sha256"]
    with torch.no_grad():
        acts, _ = capture_layers(net, inputs["images"][:1], None, None, layer_names(net))
    assert set(ref["layers"]) == set(layer_names(net))
    for name, want in ref["layers"].items():
        assert tuple(acts[name].shape[1:]) == tuple(ref["shapes"][name][1:]), name
        _assert_matches(acts[name], want[:1], ref["steps"][name], f"{preset} {name}")


def test_dinov2_downsampled_input_matches_reference(dino_ref: dict, inputs: dict, vits14: DinoV2) -> None:
    ref = dino_ref["variants"]["dinov2-vits14"]["large_image"]
    _assert_matches(vits14.preprocess(inputs["large_image"]), ref["preprocessed"], ref["preprocessed_step"], "input")
    with torch.no_grad():
        acts, _ = capture_layers(vits14, inputs["large_image"], None, None, list(ref["layers"]))
    for name, want in ref["layers"].items():
        _assert_matches(acts[name], want, ref["steps"][name], name)


def test_dinov2_swiglu_width_rule() -> None:
    assert dinov2.swiglu_hidden_features(1536) == 4096
    assert dinov2.swiglu_hidden_features(384) == 1024  # (int(1536 * 2 / 3) + 7) // 8 * 8


# ---------------------------------------------------------------------------------------------------------------
# Presets, layers and capture.


def test_presets_are_untrained_feature_networks(fid_loaded: LoadedModel, vits14_loaded: LoadedModel) -> None:
    for loaded, preset, family, resolution in ((fid_loaded, "fid-inception", "fid-inception", 299),
                                               (vits14_loaded, "dinov2-vits14", "dinov2", 224)):
        assert MODEL_PRESETS[preset] == family
        assert (loaded.family, loaded.kind, loaded.preset, loaded.trained) == (family, "feature", preset, False)
        assert (loaded.resolution, loaded.label_dim) == (resolution, 0)
        assert loaded.preprocessing == loaded.module.preprocessing and "resize" in loaded.preprocessing
        assert loaded.sha256 == state_dict_sha256(loaded.module.state_dict())
        assert not loaded.module.training and not any(p.requires_grad for p in loaded.module.parameters())
    edm = load_model(ModelSpec(preset="tiny-random"))
    assert (edm.family, edm.kind, edm.preset, edm.label_dim) == ("edm", "diffusion", "tiny-random", 1000)


def test_layer_names_and_resolution(fid_net: FIDInceptionV3, vits14: DinoV2) -> None:
    names = layer_names(fid_net)
    assert names[:4] == ["Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1"]
    assert names[-4:] == ["Mixed_7c", "pool3", "fid2048", "logits"]
    assert names[names.index("maxpool1") + 1] == "fid64" and names[names.index("maxpool2") + 1] == "fid192"
    assert names[names.index("Mixed_6e") + 1] == "fid768"
    assert resolve_layer(fid_net, "pool3") == "avgpool" and resolve_layer(fid_net, "Mixed_6e") == "Mixed_6e"
    assert [resolve_layer(fid_net, f"fid{d}") for d in (64, 192, 768, 2048)] == ["maxpool1", "maxpool2", "Mixed_6e",
                                                                                "avgpool"]
    assert layer_names(vits14) == [f"blocks.{i}" for i in range(12)] + ["cls", "patch_mean"]
    assert resolve_layer(vits14, "cls") == resolve_layer(vits14, "patch_mean") == "norm"
    with pytest.raises(UnknownLayerError) as info:
        resolve_layer(vits14, "blocks.12")
    assert "blocks.11" in str(info.value) and "patch_mean" in str(info.value)
    shapes = dict(describe_layers(vits14, batch=3))
    assert shapes["blocks.0"] == (3, 384, 16, 16) and shapes["cls"] == (3, 384)
    fid_shapes = dict(describe_layers(fid_net))
    assert fid_shapes["Mixed_6e"] == (1, 768, 17, 17)
    assert [fid_shapes[f"fid{d}"] for d in (64, 192, 768, 2048)] == [(1, 64), (1, 192), (1, 768), (1, 2048)]


def test_capture_stops_early_and_pools(vits14: DinoV2, vits14_run: tuple, inputs: dict) -> None:
    maps = vits14_run[0]
    ran: list[int] = []
    handles = [b.register_forward_hook(lambda *_a, i=i: ran.append(i)) for i, b in enumerate(vits14.blocks)]
    try:
        with torch.no_grad():  # σ is ignored by feature networks
            acts, out = capture_layers(vits14, inputs["images"], 0.5, None, ["blocks.2", "blocks.0"], pool="mean")
    finally:
        for h in handles:
            h.remove()
    assert out is None and ran == [0, 1, 2] and list(acts) == ["blocks.2", "blocks.0"]
    for name in acts:
        torch.testing.assert_close(acts[name], maps[name].mean(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    with torch.no_grad():
        pooled, _ = capture_layers(vits14, inputs["images"][:1], None, None, ["blocks.1", "cls"], pool="max")
    torch.testing.assert_close(pooled["blocks.1"], maps["blocks.1"][:1].amax(dim=(2, 3)), rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pooled["cls"], maps["cls"][:1], rtol=1e-5, atol=1e-6)  # vectors are left as they are
    assert _no_hooks(vits14)


def test_float_images_equal_uint8(fid_net: FIDInceptionV3, vits14: DinoV2, inputs: dict) -> None:
    for net in (fid_net, vits14):
        want = net.preprocess(inputs["images"])
        for images in (inputs["images"].float(), inputs["images"].double()):
            torch.testing.assert_close(net.preprocess(images), want, rtol=0, atol=0)
            assert net.preprocess(images).dtype == torch.float32


def test_bad_image_batches_are_refused(vits14: DinoV2, fid_net: FIDInceptionV3) -> None:
    for net, images in ((vits14, torch.zeros(2, 1, 64, 64, dtype=torch.uint8)),
                        (fid_net, torch.zeros(3, 64, 64, dtype=torch.uint8)),
                        (fid_net, torch.zeros(1, 3, 64, 64, dtype=torch.int64))):
        with pytest.raises(InvalidImageBatchError) as info:
            net(images)
        assert isinstance(info.value, ImzarrError)
    assert _no_hooks(vits14)


# ---------------------------------------------------------------------------------------------------------------
# Checkpoints in the published format (plain `torch.save(state_dict)`).


def test_fid_checkpoint_infers_family_and_reproduces(tmp_path: Path, fid_net: FIDInceptionV3, fid_acts: dict,
                                                     inputs: dict) -> None:
    state = fid_net.state_dict()
    file = tmp_path / "pt_inception-2015-12-05-6726825d.pth"
    torch.save(state, file)
    loaded = load_model(ModelSpec(checkpoint=str(file)))
    assert (loaded.family, loaded.kind, loaded.preset, loaded.trained) == ("fid-inception", "feature", "fid-inception",
                                                                           True)
    assert loaded.sha256 == file_sha256(file)
    with torch.no_grad():
        acts, _ = capture_layers(loaded.module, inputs["images"][:1], None, None, ["pool3"])
    torch.testing.assert_close(acts["pool3"], fid_acts["pool3"][:1], rtol=0, atol=0)
    # Files written before BatchNorm counted batches lack num_batches_tracked; they load all the same.
    without_counters = {k: v for k, v in state.items() if not k.endswith("num_batches_tracked")}
    rebuilt = FAMILIES["fid-inception"].load(file, without_counters, "cpu").state_dict()
    assert list(rebuilt) == list(state) and all(torch.equal(rebuilt[k], v) for k, v in state.items())


def test_dinov2_checkpoint_infers_preset_and_reproduces(tmp_path: Path, vits14_run: tuple, inputs: dict,
                                                        vits14: DinoV2) -> None:
    file = tmp_path / "dinov2_vits14_pretrain.pth"
    torch.save(vits14.state_dict(), file)
    loaded = load_model(ModelSpec(checkpoint=str(file)))
    assert (loaded.family, loaded.preset, loaded.trained, loaded.resolution) == ("dinov2", "dinov2-vits14", True, 224)
    with torch.no_grad():
        got = loaded.module(inputs["images"][:1])
    torch.testing.assert_close(got, vits14_run[1][:1], rtol=0, atol=0)


def test_dinov2_checkpoint_config_from_shapes(tmp_path: Path) -> None:
    config = {**dinov2.PRESETS["dinov2-vits14"], "ffn": "swiglufused", "depth": 2}
    file = tmp_path / "small_swiglu_two_blocks.pth"
    torch.save(dinov2.random_state_dict(config, seed=3), file)
    family, state = family_of_checkpoint(file)
    assert family.name == "dinov2" and state is not None
    loaded = load_model(ModelSpec(checkpoint=str(file)))
    assert loaded.preset is None  # no preset has two blocks
    with torch.device("meta"):
        want = dinov2.build(config).config
    assert loaded.config == want and loaded.config["ffn"] == "swiglufused"


def test_other_inception_and_registered_dinov2_are_refused(tmp_path: Path, fid_net: FIDInceptionV3) -> None:
    imagenet_style = dict(fid_net.state_dict())
    imagenet_style["fc.weight"] = torch.zeros(1000, 2048)
    imagenet_style["fc.bias"] = torch.zeros(1000)
    imagenet_style["AuxLogits.fc.weight"] = torch.zeros(1000, 768)
    file = tmp_path / "inception_v3_google.pth"
    torch.save(imagenet_style, file)
    with pytest.raises(NotFIDInceptionError, match="not the FID network") as info:
        load_model(ModelSpec(checkpoint=str(file)))
    assert isinstance(info.value, ImzarrError) and str(file) in str(info.value)

    incomplete = {k: v for k, v in fid_net.state_dict().items() if not k.startswith("Mixed_7c.")}
    file = tmp_path / "incomplete_inception.pth"
    torch.save(incomplete, file)
    with pytest.raises(CheckpointMismatchError, match=r"missing: Mixed_7c\.") as info:  # named as missing, not "not EDM"
        load_model(ModelSpec(checkpoint=str(file)))
    assert str(file) in str(info.value)

    with torch.device("meta"):
        one_block = dinov2.build({**dinov2.PRESETS["dinov2-vits14"], "depth": 1})
    registered = {k: torch.zeros(v.shape) for k, v in one_block.state_dict().items()}
    registered["register_tokens"] = torch.zeros(1, 4, 384)
    file = tmp_path / "dinov2_vits14_reg4_pretrain.pth"
    torch.save(registered, file)
    with pytest.raises(UnsupportedDinoV2Error, match="register tokens"):
        load_model(ModelSpec(checkpoint=str(file)))


def test_model_errors_are_bad_input_errors(vits14: DinoV2) -> None:
    with pytest.raises(UnknownPresetError) as preset:
        ModelSpec(preset="dinov2-vith14")
    with pytest.raises(UnknownLayerError) as layer:
        resolve_layer(vits14, "pool3")
    for error in (preset.value, layer.value, CheckpointError("x")):
        assert isinstance(error, ImzarrError) and error.exit_code == 2 and isinstance(error, ValueError)


@pytest.mark.parametrize(
    "preset, dropped, message",
    [
        ("fid-inception", "Conv2d_1a_3x3.conv.weight", r"1 missing: Conv2d_1a_3x3\.conv\.weight"),
        ("dinov2-vits14", "norm.weight", r"1 missing: norm\.weight"),
        ("dinov2-vits14", "cls_token", r"a DINOv2 state dict without cls_token \(the network's shape is read from it\)"),
    ],
)
def test_a_feature_checkpoint_missing_a_signature_key_is_told_which(tmp_path: Path, preset: str, dropped: str, message: str) -> None:
    """One key short of its family's signature, a checkpoint is still that family's, and the refusal names the key
    (it was taken for an EDM network and refused as 'does not look like an EDM state dict')."""
    from extractor.models import build_preset

    state = build_preset(preset).state_dict()
    del state[dropped]
    path = tmp_path / "short.pth"
    torch.save(state, path)
    with pytest.raises(CheckpointMismatchError, match=message):
        load_model(ModelSpec(checkpoint=str(path)))
