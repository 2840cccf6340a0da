"""EDMPrecond / DhariwalUNet: numerical agreement with the original (fixture) and architecture properties."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from extractor.models import (
    PRESETS,
    EDMPrecond,
    InvalidClassLabelsError,
    InvalidSigmaError,
    UnsupportedConfigError,
    autocast_context,
    build_preset,
    load_model,
    ModelSpec,
    state_dict_sha256,
)
from extractor.models.edm import Conv2d, GroupNorm, PositionalEmbedding, UNetBlock

RTOL, ATOL = 1e-4, 1e-5

# A 4-level config the fixture does not cover: several blocks, attention at a narrow level (32x32, 32 channels:
# silently none), at 8x8 (64 channels: one head) and in the 4x4 mid block (128 channels: two heads).
FOUR_LEVEL = dict(
    img_resolution=32,
    img_channels=3,
    label_dim=10,
    model_channels=32,
    channel_mult=[1, 2, 2, 4],
    channel_mult_emb=4,
    num_blocks=2,
    attn_resolutions=[32, 8],
    dropout=0.0,
)



@pytest.fixture(scope="module")
def ref_model(edm_reference: dict) -> EDMPrecond:
    model = EDMPrecond(**edm_reference["config"]).eval()
    model.load_state_dict(edm_reference["state_dict"], strict=True)
    return model


def _run_with_hooks(model: EDMPrecond, paths: list[str], *args) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    outputs: dict[str, torch.Tensor] = {}
    handles = [
        model.get_submodule(p).register_forward_hook(lambda _m, _i, out, p=p: outputs.__setitem__(p, out))
        for p in paths
    ]
    try:
        with torch.no_grad():
            out = model(*args)
    finally:
        for h in handles:
            h.remove()
    return out, outputs


# ---------------------------------------------------------------------------------------------------------------
# Agreement with the original implementation.


def test_fixture_state_dict_keys_and_order_match(edm_reference: dict) -> None:
    model = EDMPrecond(**edm_reference["config"])
    got = {k: tuple(v.shape) for k, v in model.state_dict().items()}
    want = {k: tuple(v.shape) for k, v in edm_reference["state_dict"].items()}
    assert list(got) == list(want)
    assert got == want


def test_fixture_output_and_every_activation(edm_reference: dict, ref_model: EDMPrecond) -> None:
    paths = list(edm_reference["module_order"]) + [k for k in edm_reference["extras"] if k.startswith("model.")]
    out, acts = _run_with_hooks(ref_model, paths, edm_reference["x"], edm_reference["sigma"], edm_reference["class_labels"])
    torch.testing.assert_close(out, edm_reference["out"], rtol=RTOL, atol=ATOL)
    assert set(edm_reference["activations"]) == set(edm_reference["module_order"])
    for path in edm_reference["module_order"]:
        torch.testing.assert_close(acts[path], edm_reference["activations"][path], rtol=RTOL, atol=ATOL, msg=path)
    for path in paths[len(edm_reference["module_order"]):]:
        torch.testing.assert_close(acts[path], edm_reference["extras"][path], rtol=RTOL, atol=ATOL, msg=path)


def test_fixture_shared_embedding(edm_reference: dict, ref_model: EDMPrecond) -> None:
    c_noise = edm_reference["sigma"].log() / 4
    with torch.no_grad():
        emb = ref_model.model.embedding(c_noise, edm_reference["class_labels"])
    torch.testing.assert_close(emb, edm_reference["extras"]["emb"], rtol=RTOL, atol=ATOL)


def test_module_execution_order_matches_fixture(edm_reference: dict, ref_model: EDMPrecond) -> None:
    order: list[str] = []
    handles = [
        ref_model.get_submodule(p).register_forward_hook(lambda *_a, p=p: order.append(p))
        for p in edm_reference["module_order"]
    ]
    with torch.no_grad():
        ref_model(edm_reference["x"][:1], edm_reference["sigma"][:1], edm_reference["class_labels"][:1])
    for h in handles:
        h.remove()
    assert order == list(edm_reference["module_order"])


def test_integer_class_ids_equal_one_hot(edm_reference: dict, ref_model: EDMPrecond) -> None:
    ids = edm_reference["class_labels"].argmax(dim=1)
    with torch.no_grad():
        out = ref_model(edm_reference["x"], edm_reference["sigma"], ids)
    torch.testing.assert_close(out, edm_reference["out"], rtol=RTOL, atol=ATOL)


def test_none_labels_equal_zero_labels_and_soft_labels_used_as_is(edm_reference: dict, ref_model: EDMPrecond) -> None:
    x, sigma = edm_reference["x"][:2], edm_reference["sigma"][:2]
    with torch.no_grad():
        none = ref_model(x, sigma, None)
        zeros = ref_model(x, sigma, torch.zeros(2, 1000))
        soft = torch.full((2, 1000), 1e-3)
        out_soft = ref_model(x, sigma, soft)
        emb_soft = ref_model.model.embedding(sigma.log() / 4, soft)
        emb_hot = ref_model.model.embedding(sigma.log() / 4, edm_reference["class_labels"][:2])
    torch.testing.assert_close(none, zeros, rtol=0, atol=0)
    assert not torch.allclose(out_soft, none)
    assert not torch.allclose(emb_soft, emb_hot)


def test_bad_class_labels_are_rejected(ref_model: EDMPrecond) -> None:
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(InvalidClassLabelsError, match="1000"):
        ref_model(x, 1.0, torch.tensor([3, 1000]))
    with pytest.raises(InvalidClassLabelsError):
        ref_model(x, 1.0, torch.tensor([3]))
    with pytest.raises(InvalidClassLabelsError):
        ref_model(x, 1.0, torch.zeros(2, 10))


@pytest.mark.parametrize("bad", [0.0, -1.0, float("nan"), float("inf")])
def test_non_positive_sigma_is_refused(ref_model: EDMPrecond, bad: float) -> None:
    x = torch.zeros(2, 3, 32, 32)
    with pytest.raises(InvalidSigmaError, match="0.002") as info:
        ref_model(x, torch.tensor([1.0, bad]))
    assert isinstance(info.value, ValueError)


def test_scalar_sigma_broadcasts(edm_reference: dict, ref_model: EDMPrecond) -> None:
    x = edm_reference["x"][:3]
    labels = edm_reference["class_labels"][:3]
    with torch.no_grad():
        a = ref_model(x, 2.5, labels)
        b = ref_model(x, torch.full((3,), 2.5), labels)
    torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_preconditioning_coefficients(edm_reference: dict, ref_model: EDMPrecond) -> None:
    """D = c_skip x + c_out F(c_in x, ln(sigma)/4) with sigma_data 0.5, checked at sigma = 0.5 by hand."""
    seen: dict[str, torch.Tensor] = {}

    def grab(_module, args, kwargs, output):
        seen["x_in"], seen["c_noise"], seen["F"] = args[0], args[1], output

    handle = ref_model.model.register_forward_hook(grab, with_kwargs=True)
    x = edm_reference["x"][:2]
    with torch.no_grad():
        out = ref_model(x, torch.tensor([0.5, 0.5]), edm_reference["class_labels"][:2])
    handle.remove()
    c_skip, c_out, c_in = 0.5, 0.25 / math.sqrt(0.5), 1 / math.sqrt(0.5)
    torch.testing.assert_close(seen["x_in"], x * c_in)
    torch.testing.assert_close(seen["c_noise"], torch.full((2,), math.log(0.5) / 4))
    torch.testing.assert_close(out, c_skip * x + c_out * seen["F"])


# ---------------------------------------------------------------------------------------------------------------
# Building blocks.


def test_group_norm_groups() -> None:
    assert GroupNorm(192).num_groups == 32
    assert GroupNorm(96).num_groups == 24
    assert GroupNorm(64).num_groups == 16
    assert GroupNorm(64).eps == 1e-5
    x = torch.randn(2, 96, 4, 4)
    torch.testing.assert_close(GroupNorm(96)(x), F.group_norm(x, 24, eps=1e-5))


def test_positional_embedding_formula() -> None:
    emb = PositionalEmbedding(192)
    c = torch.tensor([0.3, -1.2])
    got = emb(c)
    i = torch.arange(96, dtype=torch.float32)
    freqs = (1 / 10000) ** (i / 96)
    angle = c[:, None] * freqs[None]
    torch.testing.assert_close(got, torch.cat([angle.cos(), angle.sin()], dim=1))
    assert got.shape == (2, 192)


def test_resampling_is_2x2_box() -> None:
    x = torch.randn(2, 5, 8, 8)
    down = Conv2d(5, 5, kernel=0, down=True)
    up = Conv2d(5, 5, kernel=0, up=True)
    assert set(down.state_dict()) == {"resample_filter"}
    torch.testing.assert_close(down.resample_filter, torch.full((1, 1, 2, 2), 0.25))
    torch.testing.assert_close(down(x), F.avg_pool2d(x, 2))
    torch.testing.assert_close(up(x), x.repeat_interleave(2, dim=2).repeat_interleave(2, dim=3))


def _reference_attention_block(
    block: UNetBlock, h: torch.Tensor, heads: int, adm_layout: bool = False
) -> torch.Tensor:
    """Hand-written attention part of a block: interleaved (head, channel, q|k|v) qkv layout, softmax in fp32.

    `adm_layout` reads the qkv channels as ADM's [q | k | v] blocks instead (what EDM does NOT do).
    """
    n, c, hh, ww = h.shape
    qkv = block.qkv(block.norm2(h))
    if adm_layout:
        q, k, v = (t.reshape(n * heads, c // heads, hh * ww) for t in qkv.chunk(3, dim=1))
    else:
        qkv = qkv.reshape(n * heads, c // heads, 3, hh * ww)
        q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    w = torch.einsum("ncq,nck->nqk", q, k / math.sqrt(c // heads)).softmax(dim=2)
    a = torch.einsum("nqk,nck->ncq", w, v).reshape(n, c, hh, ww)
    return block.proj(a) + h


def test_attention_heads_and_interleaved_qkv_layout() -> None:
    torch.manual_seed(0)
    block = UNetBlock(128, 128, emb_channels=16, attention=True).eval()
    with torch.no_grad():
        for p in block.parameters():  # make the zero-initialised branches matter
            p.add_(torch.randn_like(p) * 0.1)
    assert block.num_heads == 2
    x, emb = torch.randn(2, 128, 4, 4), torch.randn(2, 16)
    # The input of the attention part (the residual branch's result), taken from the block's own norm2.
    seen = {}
    handle = block.norm2.register_forward_hook(lambda _m, args, _o: seen.__setitem__("h", args[0]))
    with torch.no_grad():
        out = block(x, emb)
        handle.remove()
        want = _reference_attention_block(block, seen["h"], heads=2)
        one_head = _reference_attention_block(block, seen["h"], heads=1)
        adm = _reference_attention_block(block, seen["h"], heads=2, adm_layout=True)
    torch.testing.assert_close(out, want, rtol=1e-5, atol=1e-5)
    assert not torch.allclose(out, one_head, atol=1e-3)
    assert not torch.allclose(out, adm, atol=1e-3)


def test_attention_at_narrow_width_is_silently_absent() -> None:
    block = UNetBlock(32, 32, emb_channels=16, attention=True)
    assert block.num_heads == 0
    assert not any(k.startswith(("norm2", "qkv", "proj")) for k in block.state_dict())
    model = EDMPrecond(**FOUR_LEVEL)
    keys = model.state_dict()
    assert "model.enc.32x32_block0.qkv.weight" not in keys  # 32 channels < one 64-channel head
    assert keys["model.enc.8x8_block1.qkv.weight"].shape == (192, 64, 1, 1)
    assert model.model.enc["8x8_block0"].num_heads == 1
    assert model.model.dec["4x4_in0"].num_heads == 2
    assert model.model.dec["4x4_in1"].num_heads == 0


# ---------------------------------------------------------------------------------------------------------------
# Whole-network structure for configs the fixture does not cover.


def _expected_key_count(cfg: dict) -> int:
    """Independent count of state-dict entries from the architecture description."""
    mc, mult, nb = cfg["model_channels"], cfg["channel_mult"], cfg["num_blocks"]
    res0 = cfg["img_resolution"]

    def block(cin: int, cout: int, resample: bool, attn: bool) -> int:
        n = 10  # norm0, conv0, affine, norm1, conv1 (weight + bias each)
        if resample:
            n += 2  # conv0.resample_filter, skip.resample_filter
        elif cin != cout:
            n += 2  # 1x1 skip
        if attn and cout // 64:
            n += 6  # norm2, qkv, proj
        return n

    total = 4 + (1 if cfg["label_dim"] else 0) + 2 + 4  # mapping, enc conv, out_norm + out_conv
    widths = [mc * mult[0]]
    cout = mc * mult[0]
    for level, m in enumerate(mult):
        res = res0 >> level
        if level:
            total += block(cout, cout, True, False)
            widths.append(cout)
        for _ in range(nb):
            total += block(cout, mc * m, False, res in cfg["attn_resolutions"])
            cout = mc * m
            widths.append(cout)
    for level, m in reversed(list(enumerate(mult))):
        res = res0 >> level
        if level == len(mult) - 1:
            total += block(cout, cout, False, True) + block(cout, cout, False, False)
        else:
            total += block(cout, cout, True, False)
        for _ in range(nb + 1):
            cin = cout + widths.pop()
            total += block(cin, mc * m, False, res in cfg["attn_resolutions"])
            cout = mc * m
    return total


def test_four_level_key_names_and_count() -> None:
    model = EDMPrecond(**FOUR_LEVEL)
    sd = model.state_dict()
    assert len(sd) == _expected_key_count(FOUR_LEVEL)
    assert list(model.model.enc) == [
        "32x32_conv", "32x32_block0", "32x32_block1",
        "16x16_down", "16x16_block0", "16x16_block1",
        "8x8_down", "8x8_block0", "8x8_block1",
        "4x4_down", "4x4_block0", "4x4_block1",
    ]  # fmt: skip
    assert list(model.model.dec) == [
        "4x4_in0", "4x4_in1", "4x4_block0", "4x4_block1", "4x4_block2",
        "8x8_up", "8x8_block0", "8x8_block1", "8x8_block2",
        "16x16_up", "16x16_block0", "16x16_block1", "16x16_block2",
        "32x32_up", "32x32_block0", "32x32_block1", "32x32_block2",
    ]  # fmt: skip
    assert sd["model.map_label.weight"].shape == (128, 10)
    assert "model.map_label.bias" not in sd
    assert sd["model.enc.4x4_down.conv0.resample_filter"].shape == (1, 1, 2, 2)
    assert "model.enc.4x4_down.skip.weight" not in sd
    assert sd["model.enc.4x4_block0.skip.weight"].shape == (128, 64, 1, 1)
    assert sd["model.dec.4x4_in0.qkv.weight"].shape == (384, 128, 1, 1)
    assert sd["model.out_conv.weight"].shape == (3, 32, 3, 3)


def test_decoder_skip_concatenation_widths() -> None:
    model = EDMPrecond(**FOUR_LEVEL)
    in_widths = {name: block.in_channels for name, block in model.model.dec.items()}
    assert in_widths == {
        "4x4_in0": 128, "4x4_in1": 128,
        "4x4_block0": 256, "4x4_block1": 256, "4x4_block2": 128 + 64,
        "8x8_up": 128, "8x8_block0": 128 + 64, "8x8_block1": 64 + 64, "8x8_block2": 64 + 64,
        "16x16_up": 64, "16x16_block0": 64 + 64, "16x16_block1": 64 + 64, "16x16_block2": 64 + 32,
        "32x32_up": 64, "32x32_block0": 64 + 32, "32x32_block1": 32 + 32, "32x32_block2": 32 + 32,
    }  # fmt: skip


def test_decoder_concatenates_encoder_outputs_in_reverse_order() -> None:
    torch.manual_seed(1)
    model = EDMPrecond(**FOUR_LEVEL).eval()
    model.reset_parameters(zero_init_scale=0.3, seed=1)
    enc_out: list[torch.Tensor] = []
    dec_in: dict[str, torch.Tensor] = {}
    handles = [b.register_forward_hook(lambda _m, _i, o: enc_out.append(o)) for b in model.model.enc.values()]
    handles += [
        b.register_forward_pre_hook(lambda _m, args, n=n: dec_in.__setitem__(n, args[0]))
        for n, b in model.model.dec.items()
    ]
    with torch.no_grad():
        out = model(torch.randn(2, 3, 32, 32), torch.tensor([1.0, 3.0]), torch.tensor([1, 7]))
    for h in handles:
        h.remove()
    assert out.shape == (2, 3, 32, 32)
    prev_width = None
    skips = list(enc_out)
    for name, block in model.model.dec.items():
        assert dec_in[name].shape[1] == block.in_channels, name
        if prev_width is not None and block.in_channels != prev_width:
            torch.testing.assert_close(dec_in[name][:, prev_width:], skips.pop(), rtol=0, atol=0)
        prev_width = block.out_channels
    assert skips == []


def test_unsupported_model_type() -> None:
    with pytest.raises(UnsupportedConfigError, match="SongUNet"):
        EDMPrecond(img_resolution=32, img_channels=3, model_type="SongUNet")


def test_use_fp16_is_accepted_and_does_not_change_cpu_numbers(edm_reference: dict, ref_model: EDMPrecond) -> None:
    model = EDMPrecond(**{**edm_reference["config"], "use_fp16": True}).eval()
    model.load_state_dict(edm_reference["state_dict"])
    assert model.use_fp16 is True and model.config["use_fp16"] is True
    with torch.no_grad():
        out = model(edm_reference["x"], edm_reference["sigma"], edm_reference["class_labels"])
    torch.testing.assert_close(out, edm_reference["out"], rtol=RTOL, atol=ATOL)


# ---------------------------------------------------------------------------------------------------------------
# Presets and precision.


def test_dmd2_preset_on_meta_device() -> None:
    cfg = PRESETS["dmd2-imagenet64"]
    assert cfg["model_channels"] == 192 and cfg["channel_mult"] == [1, 2, 3, 4] and cfg["num_blocks"] == 3
    with torch.device("meta"):
        model = EDMPrecond(**cfg)
    sd = model.state_dict()
    assert len(sd) == 553 == _expected_key_count(cfg)
    shapes = {k: tuple(v.shape) for k, v in sd.items()}
    assert shapes["model.map_layer0.weight"] == (768, 192)
    assert shapes["model.map_label.weight"] == (768, 1000)
    assert shapes["model.enc.64x64_conv.weight"] == (192, 3, 3, 3)
    assert shapes["model.enc.8x8_block2.qkv.weight"] == (2304, 768, 1, 1)
    assert shapes["model.enc.32x32_block0.qkv.weight"] == (1152, 384, 1, 1)
    assert shapes["model.dec.8x8_in0.norm2.bias"] == (768,)
    assert shapes["model.dec.64x64_block0.skip.weight"] == (192, 576, 1, 1)
    assert shapes["model.dec.64x64_block3.norm0.weight"] == (384,)
    assert "model.enc.64x64_block0.qkv.weight" not in shapes
    assert "model.dec.8x8_in1.qkv.weight" not in shapes
    n_params = sum(p.numel() for p in model.parameters())
    assert abs(n_params - 295.9e6) < 0.1e6
    assert model.model.dec["8x8_in0"].num_heads == 12


def test_tiny_random_preset_is_deterministic_and_small() -> None:
    a = build_preset("tiny-random")
    b = build_preset("tiny-random")
    sd_a, sd_b = a.state_dict(), b.state_dict()
    assert all(torch.equal(sd_a[k], sd_b[k]) for k in sd_a)
    # Pinned: the same weights on every machine and torch build (extractor/models/seeded.py; also in
    # tests/extractor/test_seeded_weights.py).
    assert state_dict_sha256(sd_a) == "39689dda1862259f3589ff1907227e16488ddbbe5eca343abc9b9f36cdc473a6"
    n_params = sum(p.numel() for p in a.parameters())
    assert 1e6 < n_params < 10e6
    # Residual branches are non-zero so that every layer changes the output.
    assert sd_a["model.enc.64x64_block0.conv1.weight"].abs().sum() > 0
    assert sd_a["model.out_conv.weight"].abs().sum() > 0


def test_building_a_preset_leaves_the_global_rng_alone() -> None:
    torch.manual_seed(123)
    want = torch.rand(3)
    torch.manual_seed(123)
    build_preset("tiny-random")
    torch.testing.assert_close(torch.rand(3), want, rtol=0, atol=0)


def test_loaded_preset_says_it_is_untrained() -> None:
    loaded = load_model(ModelSpec(preset="tiny-random"))
    assert loaded.trained is False
    assert loaded.name == "tiny-random"
    assert loaded.resolution == 64 and loaded.label_dim == 1000
    assert loaded.config["model_channels"] == 32
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    assert loaded.sha256 == state_dict_sha256(build_preset("tiny-random").state_dict())


def test_autocast_context_choices() -> None:
    assert isinstance(autocast_context("cpu", "fp32"), type(autocast_context("cuda", "fp32")))
    with pytest.raises(ValueError, match="fp8"):
        autocast_context("cpu", "fp8")
    with pytest.raises(ValueError, match="not supported on device cpu"):
        autocast_context("cpu", "fp16")


def test_bf16_autocast_on_cpu_is_close_and_returns_fp32() -> None:
    model = build_preset("tiny-random").eval()
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        full = model(x, 2.5, torch.tensor([1, 2]))
        with autocast_context("cpu", "bf16"):
            half = model(x, 2.5, torch.tensor([1, 2]))
    assert half.dtype == torch.float32
    torch.testing.assert_close(half, full, rtol=0.05, atol=0.05)


@pytest.mark.slow
def test_dmd2_full_size_forward_on_cpu() -> None:
    model = build_preset("dmd2-imagenet64").eval()
    # Pinned here, where the suite builds the full preset anyway: the same weights on every machine and torch build
    # (extractor/models/seeded.py; the other presets are pinned in tests/extractor/test_seeded_weights.py).
    assert state_dict_sha256(model.state_dict()) == "f9c2a3915e3661494f640d15ff4dc3fd002d227e2f8e6dcb2581db5804ef21ff"
    x = torch.randn(2, 3, 64, 64, generator=torch.Generator().manual_seed(0)) * 80
    with torch.no_grad():
        out = model(x, torch.full((2,), 80.0), torch.tensor([207, 999]))
    assert out.shape == (2, 3, 64, 64) and out.dtype == torch.float32
    assert torch.isfinite(out).all()
    # EDM's init zeroes out_conv, so a fresh network is the pure skip path: D = c_skip x.
    torch.testing.assert_close(out, x * 0.25 / (80.0**2 + 0.25))
    # With out_conv (and every zero-initialised layer) drawn non-zero, the U-Net body must reach the output: at
    # σ = 0.5, c_out = 0.35 weighs its F_x. Each sample is computed on its own (a batch of one gives row 0), and
    # the class label conditions it.
    model.reset_parameters(zero_init_scale=0.2, seed=0)
    x = x / 80 * 0.5
    sigma = torch.full((2,), 0.5)
    with torch.no_grad():
        out = model(x, sigma, torch.tensor([207, 999]))
        alone = model(x[:1], sigma[:1], torch.tensor([207]))
        relabelled = model(x[:1], sigma[:1], torch.tensor([0]))
    skip = x * 0.25 / (0.5**2 + 0.25)
    assert torch.isfinite(out).all() and (out - skip).abs().mean() > 0.1 * skip.abs().mean()
    torch.testing.assert_close(alone, out[:1], rtol=1e-4, atol=1e-5)
    assert (relabelled - alone).abs().max() > 1e-3


def test_construction_init_follows_edm_weight_init() -> None:
    """kaiming_uniform weight and bias scaled by sqrt(1/3), drawn from the global RNG in that order."""
    torch.manual_seed(5)
    gain = math.sqrt(1 / 3)
    conv = Conv2d(8, 16, kernel=3, init_mode="kaiming_uniform", init_weight=gain, init_bias=gain)
    torch.manual_seed(5)
    bound = math.sqrt(3 / 72)
    weight = bound * (torch.rand(16, 8, 3, 3) * 2 - 1) * math.sqrt(1 / 3)
    bias = bound * (torch.rand(16) * 2 - 1) * math.sqrt(1 / 3)
    torch.testing.assert_close(conv.weight.detach(), weight, rtol=0, atol=0)
    torch.testing.assert_close(conv.bias.detach(), bias, rtol=0, atol=0)
    zero = UNetBlock(8, 8, emb_channels=4).conv1
    assert zero.weight.abs().sum() == 0 and zero.bias.abs().sum() == 0


def test_config_round_trips_through_the_constructor() -> None:
    from extractor.models.edm import CONFIG_KEYS

    model = EDMPrecond(**FOUR_LEVEL)
    assert tuple(model.config) == CONFIG_KEYS
    with torch.device("meta"):
        again = EDMPrecond(**model.config)
    assert again.config == model.config
