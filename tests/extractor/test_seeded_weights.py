"""Seeded preset weights (extractor/models/seeded.py): pinned bits on every machine, CPU and torch build.

The hashes are `state_dict_sha256` of each preset's state dict (key names, dtypes, shapes and raw bytes). They
hold whatever torch's RNG, build or CPU: the draws come from the project's counter-based recipe, not from torch.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch

from extractor import noise_cpu
from extractor.models import build_preset, dinov2, fid_inception, seeded, state_dict_sha256
from extractor.noise import per_sample_noise, sample_keys, splitmix64_words

# Every preset, on every lane. dmd2-imagenet64 (296 M weights) is pinned where the suite builds it anyway
# (tests/extractor/test_edm_model.py::test_dmd2_full_size_forward_on_cpu). The three wide DINOv2 presets are pinned at their
# full widths and depth 2: state-dict positions, and so the draws, of the first two blocks are the full preset's
# (cls_token, pos_embed, mask_token, patch_embed.*, blocks.0.*, blocks.1.* come first); the full-depth draws take
# 86 M to 1.1 G normals each, too slow for the suite.
PINNED = {
    "tiny-random": "39689dda1862259f3589ff1907227e16488ddbbe5eca343abc9b9f36cdc473a6",
    "fid-inception": "d55e5ce62fd8888bc4958b17043c3fcc21e6d000244648d9ab80cdc25b04aba2",
    "dinov2-vits14": "0f6a7b0834b37cff2f743bb7f8bd26239e8a2e156caa675ff9386576a14f902a",
}
PINNED_DEPTH_2 = {
    "dinov2-vitb14": "55205179113ed1b22660f37a7098f467c9a0844e5d0d94bff6f633dae09afd16",
    "dinov2-vitl14": "4a05cb488c731238ea69cbb37590b002a2f04610584af793a2ad3c84e5d1e78e",
    "dinov2-vitg14": "ca9045df8facb3b2753d0b261be26d9301fbf19e5b852e83758247bafa6920e2",
}


@pytest.fixture(scope="module")
def fid_state() -> dict[str, torch.Tensor]:
    return fid_inception.random_state_dict(fid_inception.PRESETS["fid-inception"], fid_inception.PRESET_SEED)


@pytest.mark.parametrize("preset", ["tiny-random", "dinov2-vits14"])
def test_preset_weights_are_pinned(preset: str) -> None:
    assert state_dict_sha256(build_preset(preset).state_dict()) == PINNED[preset]


def test_fid_inception_weights_are_pinned(fid_state: dict) -> None:
    """The preset's state dict (its family's `seeded` loads exactly this: tests/extractor/test_feature_models.py)."""
    assert state_dict_sha256(fid_state) == PINNED["fid-inception"]


@pytest.mark.parametrize("preset", list(PINNED_DEPTH_2))
def test_wide_dinov2_weights_are_pinned_at_depth_two(preset: str) -> None:
    config = {**dinov2.PRESETS[preset], "depth": 2}
    assert state_dict_sha256(dinov2.random_state_dict(config, dinov2.PRESET_SEED)) == PINNED_DEPTH_2[preset]


def test_draws_do_not_use_torch_rng() -> None:
    """Other global RNG states give the same weights (EDM's and the feature families' draws), and drawing them
    leaves that state as it was."""
    torch.manual_seed(12345)
    before = torch.get_rng_state()
    assert state_dict_sha256(build_preset("tiny-random").state_dict()) == PINNED["tiny-random"]
    assert torch.equal(torch.get_rng_state(), before)
    torch.manual_seed(2**40 + 7)
    torch.rand(1000)
    before = torch.get_rng_state()
    config = {**dinov2.PRESETS["dinov2-vitb14"], "depth": 2}
    assert state_dict_sha256(dinov2.random_state_dict(config, 0)) == PINNED_DEPTH_2["dinov2-vitb14"]
    assert torch.equal(torch.get_rng_state(), before)


def test_normals_are_the_noise_recipe_of_the_tensor_index() -> None:
    shape = (3, 5, 7)
    for index in (0, 1, 565):
        want = per_sample_noise(11, torch.tensor([index]), shape, "cpu")[0]
        assert torch.equal(seeded.standard_normal(11, index, shape), want)
        assert torch.equal(seeded.draw(11, index, shape, "normal"), want)
    assert not torch.equal(seeded.standard_normal(11, 0, shape), seeded.standard_normal(11, 1, shape))
    assert not torch.equal(seeded.standard_normal(11, 0, shape), seeded.standard_normal(12, 0, shape))


def test_uniforms_are_the_top_24_bits_of_the_recipe_words() -> None:
    """The compiled kernel against the recipe's torch integer ops (extractor.noise, pinned in test_noise.py)."""
    for seed, index, shape in ((0, 0, (1,)), (7, 3, (4, 1001)), (2**63 + 5, 2**40, (33,))):
        numel = int(np.prod(shape))
        words = splitmix64_words(sample_keys(seed, torch.tensor([index])), numel)[0]
        top = torch.bitwise_right_shift(words, 40).bitwise_and_((1 << 24) - 1)
        want = (top.to(torch.float64) / 2**24).to(torch.float32).reshape(shape)
        got = seeded.uniform(seed, index, shape)
        assert got.dtype == torch.float32 and torch.equal(got, want)
        assert torch.equal(seeded.draw(seed, index, shape, "uniform"), want)
        assert float(got.min()) >= 0.0 and float(got.max()) < 1.0
    key = int(sample_keys(7, torch.tensor([3]))[0])
    assert np.array_equal(noise_cpu.uniform24(key, np.empty(4004, np.float32)), seeded.uniform(7, 3, (4004,)).numpy())
    with pytest.raises(ValueError, match="normal"):
        seeded.draw(0, 0, (2,), "gamma")


def test_running_var_is_positive_without_exp(fid_state: dict) -> None:
    """running_var = 1 + 0.2 z + 0.02 z² (exp(0.2 z) to second order): ≥ 0.5 for every z."""
    state = fid_state
    index = list(state).index("Mixed_7c.branch_pool.bn.running_var")
    z = seeded.standard_normal(0, index, state["Mixed_7c.branch_pool.bn.running_var"].shape).double()
    torch.testing.assert_close(state["Mixed_7c.branch_pool.bn.running_var"].double(), 1 + 0.2 * z + 0.02 * z * z,
                               rtol=1e-6, atol=1e-6)
    assert min(float(v.min()) for k, v in state.items() if k.endswith("running_var")) >= 0.5
