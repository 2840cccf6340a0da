"""Feature networks end to end: `imzarr extract` with fid-inception / dinov2 presets and checkpoints stores what
`capture_layers` gives on the same clean images, refuses σ and noise, records the protocol, and `imzarr compare`
on pool3 gives the FID of pytorch-fid's formula."""

from __future__ import annotations

import warnings

import numpy as np
import pytest
import scipy.linalg
import torch
import zarr

from converter.convert import ConvertOptions, convert
from converter.sample import write_sample_shards
from converter.sources.npz import open_npz_source
from extractor.cli import main as extractor_main
from extractor.extraction import ExtractOptions, extract
from extractor.forward import ExtractionError, ForwardSettings, RunOptions
from extractor.generation import GenerateOptions, generate
from extractor.models import ModelSpec, build_preset, capture_layers, family_of_preset
from schemas.activation_store import validate_activation_store
from schemas.image_store import validate_image_store

NUM_IMAGES = 16  # 2 CPU cores: Inception-v3 at 299² takes ~0.2 s per image
CHECKPOINT_SAMPLES = 10
FID_RTOL = 1e-3


@pytest.fixture(scope="module")
def image_store(tmp_path_factory) -> str:
    root = tmp_path_factory.mktemp("feature-images")
    write_sample_shards(root / "npz", per_shard=NUM_IMAGES // 2, train_shards=2, val_size=4)
    url = str(root / "images.zarr")
    convert(open_npz_source([root / "npz" / "train"]), ConvertOptions(url, shuffle_seed=3, shard_size=8))
    return url


def direct_features(store_url: str, preset: str, layers: list[str], count: int) -> dict[str, np.ndarray]:
    """The reference: the network called with capture_layers on the store's first `count` images (float 0..255)."""
    images = torch.from_numpy(validate_image_store(store_url).read(0, count)).float()
    with torch.inference_mode():
        acts, _ = capture_layers(build_preset(preset).eval(), images, None, None, layers)
    return {name: value.numpy() for name, value in acts.items()}


def cli_extract(store: str, out: str, *options: str) -> None:
    assert extractor_main(["extract", store, "-o", out, "--device", "cpu", *options]) == 0


@pytest.fixture(scope="module")
def pool3_stores(image_store, tmp_path_factory) -> dict[str, str]:
    """pool3 of every image from the preset, and of the first CHECKPOINT_SAMPLES from its weights as a file
    (`checkpoint_file`)."""
    root = tmp_path_factory.mktemp("pool3")
    checkpoint = root / "pt_inception-seeded.pth"
    torch.save(build_preset("fid-inception").state_dict(), checkpoint)  # a plain state dict, the published layout
    stores = {"preset": str(root / "preset.zarr"), "checkpoint": str(root / "checkpoint.zarr"), "checkpoint_file": str(checkpoint)}
    cli_extract(image_store, stores["preset"], "--preset", "fid-inception", "--layers", "pool3", "--dtype", "float32")
    cli_extract(image_store, stores["checkpoint"], "--checkpoint", str(checkpoint), "--layers", "pool3", "--dtype", "float32",
                "--num-samples", str(CHECKPOINT_SAMPLES))
    return stores


def test_fid_inception_pool3_equals_capture_layers(image_store, pool3_stores):
    group = validate_activation_store(pool3_stores["preset"])
    expected = direct_features(image_store, "fid-inception", ["pool3"], NUM_IMAGES)["pool3"]
    assert group["pool3"].shape == (NUM_IMAGES, 2048)
    np.testing.assert_allclose(group["pool3"][:], expected, rtol=1e-4, atol=1e-5)
    attrs = dict(group.attrs)
    model = attrs["model"]
    assert model["kind"] == "feature" and model["family"] == "fid-inception" and model["preset"] == "fid-inception"
    assert model["preprocessing"] == family_of_preset("fid-inception").preprocessing and model["resolution"] == 299
    assert attrs["sigma"] is None and attrs["noise"] is None and attrs["dtypes"]["compute"] == "fp32"
    assert "sigma" not in attrs["settings"] and attrs["settings"]["noise_seed"] is None
    assert "sigma" not in group["pool3"].attrs and "preprocessed by the feature network" in group["pool3"].attrs["description"]


def test_checkpoint_gives_the_presets_features_and_names_its_preset(pool3_stores):
    preset, checkpoint = (validate_activation_store(pool3_stores[k]) for k in ("preset", "checkpoint"))
    np.testing.assert_array_equal(checkpoint["pool3"][:], preset["pool3"][:CHECKPOINT_SAMPLES])
    model = dict(checkpoint.attrs)["model"]
    assert model["preset"] == "fid-inception" and model["trained"] is True and model["checkpoint"].endswith(".pth")


def test_compare_pool3_gives_pytorch_fid_formula(pool3_stores, tmp_path):
    report = str(tmp_path / "report.zarr")
    real, generated = pool3_stores["preset"], pool3_stores["checkpoint"]
    assert extractor_main(["compare", real, generated, "--layer", "pool3", "--no-per-class", "-k", "3", "-o", report]) == 0
    got = zarr.open_group(report, mode="r").attrs["fd"]
    x1, x2 = (zarr.open_group(url, mode="r")["pool3"][:].astype(np.float64) for url in (real, generated))
    mu1, mu2 = x1.mean(axis=0), x2.mean(axis=0)
    sigma1, sigma2 = np.cov(x1, rowvar=False), np.cov(x2, rowvar=False)
    with warnings.catch_warnings():
        # Fewer samples than features: both covariances are singular, and sqrtm says so (pytorch-fid's would too).
        warnings.simplefilter("ignore", scipy.linalg.LinAlgWarning)
        covmean = scipy.linalg.sqrtm(sigma1 @ sigma2)  # as pytorch-fid's calculate_frechet_distance
    expected = float(((mu1 - mu2) ** 2).sum() + np.trace(sigma1) + np.trace(sigma2) - 2 * np.trace(covmean).real)
    assert expected > 0 and got == pytest.approx(expected, rel=FID_RTOL)


def test_dinov2_cls_and_patch_mean_equal_capture_layers(image_store, tmp_path):
    out = str(tmp_path / "dino.zarr")
    count = 8
    cli_extract(image_store, out, "--preset", "dinov2-vits14", "--layers", "cls,patch_mean", "--num-samples", str(count), "--dtype", "float32")
    group = validate_activation_store(out)
    expected = direct_features(image_store, "dinov2-vits14", ["cls", "patch_mean"], count)
    for name in ("cls", "patch_mean"):
        assert group[name].shape == (count, 384)
        np.testing.assert_allclose(group[name][:], expected[name], rtol=1e-4, atol=1e-5, err_msg=name)
    model = dict(group.attrs)["model"]
    assert model["family"] == "dinov2" and model["resolution"] == 224 and "bicubic" in model["preprocessing"]


@pytest.mark.parametrize(
    "given,option",
    [
        ({"sigma": 0.5}, "--sigma 0.5"),
        ({"noise_seed": 3}, "--seed 3"),
        ({"class_free": True}, "--class-free"),
        ({"reconstructions": True}, "--reconstructions"),
    ],
)
def test_diffusion_options_refused_for_feature_networks(image_store, tmp_path, given, option):
    fwd = ForwardSettings(ModelSpec(preset="fid-inception"), ("pool3",), **given)
    with pytest.raises(ExtractionError) as err:
        extract(ExtractOptions(image_store, str(tmp_path / "o.zarr"), fwd, run=RunOptions(device="cpu")))
    message = str(err.value)
    assert message.startswith(option) and "\n" not in message and "fid-inception" in message
    assert not (tmp_path / "o.zarr").exists()


def test_sigma_refused_on_the_command_line_in_one_line(image_store, tmp_path, capsys):
    code = extractor_main(["extract", image_store, "-o", str(tmp_path / "o.zarr"), "--preset", "fid-inception", "--layers", "pool3",
                           "--sigma", "2", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--sigma" in err[0] and "σ and noise belong to diffusion networks" in err[0]


def test_generate_refuses_a_feature_network(tmp_path):
    fwd = ForwardSettings(ModelSpec(preset="fid-inception"), ())
    with pytest.raises(ExtractionError, match="cannot generate images") as err:
        generate(GenerateOptions(str(tmp_path / "g.zarr"), fwd, per_class=1, classes=("n01440764",), run=RunOptions(device="cpu")))
    assert "\n" not in str(err.value) and not (tmp_path / "g.zarr").exists()


def test_seed_picks_per_class_samples_for_a_feature_network(image_store, pool3_stores, tmp_path, capsys):
    """One --seed serves noise and --per-class sampling: a feature network takes it where it picks samples, named
    by preset or by checkpoint, from the command line or Python, and refuses it where it would pick nothing."""
    from extractor.api import extract as api_extract

    synset = str(validate_image_store(image_store).coordinate("synset")[0])
    picks = ["--classes", synset, "--per-class", "1", "--seed", "3", "--layers", "pool3", "--dtype", "float32"]
    cli_extract(image_store, str(tmp_path / "by_checkpoint.zarr"), "--checkpoint", pool3_stores["checkpoint_file"], *picks)
    api_extract(image_store, str(tmp_path / "by_api.zarr"), preset="fid-inception", layers=["pool3"], classes=synset, per_class=1,
                seed=3, dtype="float32", device="cpu")
    by_checkpoint, by_api = (validate_activation_store(str(tmp_path / f"{name}.zarr")) for name in ("by_checkpoint", "by_api"))
    assert by_checkpoint["source_sample"].shape == (1,)
    np.testing.assert_array_equal(by_checkpoint["source_sample"][:], by_api["source_sample"][:])
    np.testing.assert_array_equal(by_checkpoint["pool3"][:], by_api["pool3"][:])
    assert dict(by_checkpoint.attrs)["noise"] is None and dict(by_checkpoint.attrs)["settings"]["noise_seed"] is None
    capsys.readouterr()  # the runs' progress lines
    code = extractor_main(["extract", image_store, "-o", str(tmp_path / "o.zarr"), "--checkpoint", pool3_stores["checkpoint_file"],
                           "--layers", "pool3", "--seed", "3", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and len(err) == 1 and "--seed 3" in err[0] and not (tmp_path / "o.zarr").exists()
    code = extractor_main(["extract", image_store, "-o", str(tmp_path / "o.zarr"), "--preset", "fid-inception", "--layers", "pool3", "--no-noise", "--device", "cpu"])
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and err == ["imzarr extract: error: --no-noise: feature networks always take the clean images (there is no noise to leave out) (fid-inception is a feature network)"]


def test_seeds_beyond_64_bits_are_refused():
    """The noise generator takes 64 bits of the seed: 2**64 would give seed 0's noise under another name."""
    from extractor.forward import ExtractionError, ForwardSettings
    from extractor.models import ModelSpec

    with pytest.raises(ExtractionError, match=r"^--seed 18446744073709551616: must be a whole number from 0 to 2\*\*64 - 1$"):
        ForwardSettings(model=ModelSpec(preset="tiny-random"), layers=("midblock",), noise_seed=2**64)
    assert ForwardSettings(model=ModelSpec(preset="tiny-random"), layers=("midblock",), noise_seed=2**64 - 1).noise_seed == 2**64 - 1


def test_features_refuses_images_and_labels_of_the_wrong_shape_as_its_own_error():
    from extractor.api import FeatureInputError, features
    from schemas.errors import ImzarrError

    good = np.zeros((2, 3, 8, 8), dtype=np.uint8)
    with pytest.raises(FeatureInputError, match=r"images must be uint8 \(N, 3, S, S\) with values 0..255, as the image store holds them, got uint8 of shape \(2, 8, 8\)") as bad_images:
        features(good[:, 0], layers=["midblock"], model="tiny-random")
    # [0, 1] floats (ImageStoreDataset(output="float")) are refused, not cast to 0s and 1s.
    with pytest.raises(FeatureInputError, match=r"values 0..255, as the image store holds them, got float32 of shape \(2, 3, 8, 8\)"):
        features(good.astype(np.float32) / 255, layers=["midblock"], model="tiny-random")
    with pytest.raises(FeatureInputError, match=r"labels must hold one label per image \(2\), got shape \(3,\)"):
        features(good, [0, 1, 2], layers=["midblock"], model="tiny-random")
    with pytest.raises(FeatureInputError, match=r"^labels: label index 1000 is outside 0..999 \(-1: unknown\)$"):
        features(good, [0, 1000], layers=["midblock"], model="tiny-random")
    assert isinstance(bad_images.value, ImzarrError) and isinstance(bad_images.value, ValueError)


def test_pooling_is_recorded_as_applied(image_store, tmp_path):
    """--pool max on a map and on a layer that is one vector already: only the map was pooled, and each layer's
    attributes say what was done (the vector's: nothing)."""
    out = str(tmp_path / "max.zarr")
    cli_extract(image_store, out, "--preset", "fid-inception", "--layers", "Mixed_7c,pool3", "--pool", "max", "--num-samples", "2")
    group = validate_activation_store(out)
    assert group["Mixed_7c"].attrs["pooling"] == "max" and "the maximum over spatial positions" in group["Mixed_7c"].attrs["description"]
    assert group["pool3"].attrs["pooling"] == "none" and "the vector (channel) of a layer that is one" in group["pool3"].attrs["description"]
    assert group.attrs["pooling"] == "max"  # the option as given (part of the run's settings)
    from extractor.api import features

    batch = validate_image_store(image_store).read(0, 2)
    direct = features(batch, layers=["Mixed_7c", "pool3"], model="fid-inception", pool="max")
    assert direct["Mixed_7c"].attrs["pooling"] == "max" and direct["pool3"].attrs["pooling"] == "none"


def test_features_say_how_labels_conditioned_the_network():
    """Unknown labels (-1, or none given) condition a diffusion network on zeros: the result says so and counts them."""
    from extractor.api import features

    images = np.zeros((3, 3, 64, 64), dtype=np.uint8)
    labelled = features(images, [0, -1, 5], layers=["midblock"], model="tiny-random", pool="mean")
    assert labelled.attrs["class_conditioning"] == "one-hot of label; zeros for the 1 samples without a label (-1)" and labelled.attrs["unknown_labels"] == 1
    unlabelled = features(images, layers=["midblock"], model="tiny-random", pool="mean")
    free = features(images, [0, 1, 5], layers=["midblock"], model="tiny-random", pool="mean", class_free=True)
    assert unlabelled.attrs["unknown_labels"] == 3 and free.attrs["class_conditioning"] == "none (zero labels)"
    np.testing.assert_array_equal(unlabelled.midblock.values, free.midblock.values)  # zeros either way
