"""Generation: reproducible per sample, equal to a direct call of the network, and a store the extractor reads."""

import numpy as np
import pytest
import torch
import zarr

from tests.support.store_edits import copy_with_group_attrs

from extractor.extraction import ExtractOptions, extract
from extractor.forward import ForwardSettings, RunOptions
from extractor.integrity import IntegrityError
from extractor.generation import GenerateOptions, generate
from extractor.models import ModelSpec, build_preset
from extractor.noise import GENERATION_NOISE_RECIPE, NOISE_RECIPE, generation_noise_seed, per_sample_noise
from schemas.api import store_info
from schemas.activation_store import validate_activation_store
from schemas.image_layout import LAYOUT_VERSION
from schemas.image_store import validate_image_store
from schemas.store_lifecycle import DONE_ARRAY

PRESET = ModelSpec(preset="tiny-random")
CLASSES = ("n01440764", "n02119789", "n09472597")


def gen(out, batch_size=64, seed=0, layers=(), acts=None, shard=4):
    fwd = ForwardSettings(PRESET, layers, noise_seed=seed, storage_dtype="float32")
    run = RunOptions(batch_size=batch_size, device="cpu", shard_size=shard)
    return generate(GenerateOptions(str(out), fwd, per_class=3, classes=CLASSES, activations_out=acts, run=run))


def test_generation_is_reproducible_and_matches_direct_call(tmp_path):
    gen(tmp_path / "a.zarr", batch_size=64)
    gen(tmp_path / "b.zarr", batch_size=2)
    a, b = (validate_image_store(str(tmp_path / f"{n}.zarr")) for n in "ab")
    # The noise is bit-identical for any batch size (tests/extractor/test_noise.py); the network's float32 sums differ by
    # ~1e-7 between batch sizes (CPU convolution kernels), enough to flip a truncated uint8 now and then.
    assert np.abs(a.image[:].astype(int) - b.image[:]).max() <= 1 and (a.image[:] == b.image[:]).mean() > 0.9999
    np.testing.assert_array_equal(a.coordinate("label"), [0, 0, 0, 278, 278, 278, 980, 980, 980])
    assert list(a.coordinate("synset")[:1]) == ["n01440764"] and a.attrs["source_format"] == "generated"
    gen(tmp_path / "c.zarr", seed=1)
    assert not np.array_equal(validate_image_store(str(tmp_path / "c.zarr")).image[:], a.image[:])
    # the reference: DMD2's sampling written out here
    model = build_preset("tiny-random").eval()
    eps = per_sample_noise(generation_noise_seed(0), np.arange(9), (3, 64, 64), "cpu")
    labels = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 278, 278, 278, 980, 980, 980]), 1000).float()
    with torch.no_grad():
        d = model(80.0 * eps, torch.full((9,), 80.0), labels)
    expected = ((d + 1) * 127.5).clamp(0, 255).to(torch.uint8).numpy()
    assert np.abs(a.image[:].astype(int) - expected).max() <= 1
    assert (a.image[:] == expected).mean() > 0.999


def test_generator_activations_and_extraction_of_generated_store(tmp_path):
    gen(tmp_path / "g.zarr", layers=("midblock",), acts=str(tmp_path / "ga.zarr"))
    acts = validate_activation_store(str(tmp_path / "ga.zarr"))
    assert acts["midblock"].shape == (9, 64, 16, 16) and dict(acts.attrs)["source"]["generated"] is True
    # Its source is recorded as extract records one: a generated store replaced since is told apart.
    images_attrs = dict(zarr.open_group(str(tmp_path / "g.zarr"), mode="r").attrs)
    source = dict(acts.attrs)["source"]
    assert (source["fingerprint"], source["generation"]) == (images_attrs["settings_fingerprint"], images_attrs["generation"])
    import xarray as xr
    from extractor.accessor import ProvenanceError

    opened = xr.open_zarr(str(tmp_path / "ga.zarr"))
    np.testing.assert_array_equal(opened.imzarr.images().image.values, validate_image_store(str(tmp_path / "g.zarr")).image[:])
    with pytest.raises(ProvenanceError, match="settings fingerprint differs"):
        opened.assign_attrs(source={**source, "fingerprint": "0" * 64}).imzarr.images()
    model = build_preset("tiny-random").eval()
    eps = per_sample_noise(generation_noise_seed(0), np.arange(9), (3, 64, 64), "cpu")
    got = {}
    model.get_submodule("model.dec.16x16_in0").register_forward_hook(lambda m, i, o: got.__setitem__("mid", o))
    labels = torch.nn.functional.one_hot(torch.tensor([0, 0, 0, 278, 278, 278, 980, 980, 980]), 1000).float()
    with torch.no_grad():
        model(80.0 * eps, torch.full((9,), 80.0), labels)
    np.testing.assert_allclose(acts["midblock"][:], got["mid"].numpy(), rtol=1e-4, atol=1e-5)
    # the generated store is an ordinary image store for the extractor
    fwd = ForwardSettings(PRESET, ("encoder_bottleneck",), pool="mean")
    extract(ExtractOptions(str(tmp_path / "g.zarr"), str(tmp_path / "e.zarr"), fwd, run=RunOptions(device="cpu")))
    ext = validate_activation_store(str(tmp_path / "e.zarr"))
    np.testing.assert_array_equal(ext["label"][:], acts["label"][:])


def test_classes_named_in_another_order_are_the_same_generation(tmp_path):
    """Samples are class-major in label order whatever order the classes are named in: one setting, one store."""
    fwd = ForwardSettings(PRESET, ())
    run = RunOptions(batch_size=8, device="cpu")
    first = generate(GenerateOptions(str(tmp_path / "g.zarr"), fwd, per_class=1, classes=("volcano", "tench", "n02119789"), run=run))
    again = generate(GenerateOptions(str(tmp_path / "g.zarr"), fwd, per_class=1, classes=("kit fox", "980", "n01440764"), run=run))
    assert not first.already_complete and again.already_complete
    assert validate_image_store(str(tmp_path / "g.zarr")).attrs["selection"]["classes"] == list(CLASSES)


def test_unfinished_generation_resumes_to_identical(tmp_path):
    """A store left with some shards unrecorded (as a crash leaves it) is finished identically by a re-run."""
    from tests.support.store_equality import stores_identical
    from schemas.store_lifecycle import mark_done

    gen(tmp_path / "ref.zarr", shard=2)
    gen(tmp_path / "x.zarr", shard=2)
    # forget two finished shards and the completion, and damage one of the forgotten shards
    group = zarr.open_group(str(tmp_path / "x.zarr"), mode="r+", use_consolidated=False)
    group.attrs["complete"] = False
    group.create_array("_progress/done", shape=(5,), chunks=(1,), dtype="int8", fill_value=0, compressors=None)
    for k in (0, 2, 4):
        mark_done(str(tmp_path / "x.zarr"), k)
    group["image"][2:4] = 0
    gen(tmp_path / "x.zarr", shard=2)
    stores_identical(str(tmp_path / "ref.zarr"), str(tmp_path / "x.zarr"))
    assert zarr.open_group(str(tmp_path / "x.zarr"), mode="r").attrs["batch_sizes"] == [64]
    # Resumed with another batch size: the store says it was made with both.
    group = zarr.open_group(str(tmp_path / "x.zarr"), mode="r+", use_consolidated=False)
    group.attrs["complete"] = False
    group.create_array("_progress/done", shape=(5,), chunks=(1,), dtype="int8", fill_value=0, compressors=None)
    gen(tmp_path / "x.zarr", shard=2, batch_size=3)
    assert zarr.open_group(str(tmp_path / "x.zarr"), mode="r").attrs["batch_sizes"] == [64, 3]


def test_generated_store_with_the_old_noise_recipe_is_refused(tmp_path):
    from extractor.store_attrs import NoiseRecipeError

    gen(tmp_path / "old.zarr")
    group = zarr.open_group(str(tmp_path / "old.zarr"), mode="r+", use_consolidated=False)
    assert group.attrs["noise"]["recipe"] == GENERATION_NOISE_RECIPE and GENERATION_NOISE_RECIPE in group.attrs["sampling"]
    attrs = dict(group.attrs)
    del attrs["noise"]  # what stores made before the recipe carried: the numpy sampling line only
    attrs["sampling"] = "one step: D(sigma * eps; sigma, one-hot(label)), eps ~ numpy default_rng([seed, index])"
    group.attrs.clear()
    group.update_attributes(attrs)
    with pytest.raises(NoiseRecipeError, match="numpy default_rng"):
        gen(tmp_path / "old.zarr")
    # Made before generation had a noise stream of its own: the same seed now gives other samples.
    gen(tmp_path / "one-stream.zarr")
    group = zarr.open_group(str(tmp_path / "one-stream.zarr"), mode="r+", use_consolidated=False)
    group.update_attributes({"noise": {**group.attrs["noise"], "recipe": NOISE_RECIPE}})
    with pytest.raises(NoiseRecipeError, match=r"its noise was made with 'splitmix64-box-muller/2', this version makes 'splitmix64-box-muller/2, generation stream'"):
        gen(tmp_path / "one-stream.zarr")


def test_extraction_noise_is_not_the_generators_input():
    """Extraction adds ε of (seed, global_index), and a generated store's global_index is its sample index: with
    one stream, extracting with the seed that generated (both default 0) gave the network its generating input."""
    index = np.arange(6)
    for seed in (0, 1, 2**64 - 1):
        generating = per_sample_noise(generation_noise_seed(seed), index, (3, 8, 8), "cpu").flatten(1)
        added = per_sample_noise(seed, index, (3, 8, 8), "cpu").flatten(1)
        correlation = (generating * added).mean(1) / (generating.std(1) * added.std(1))
        assert correlation.abs().max() < 0.5  # independent draws of 192 values: |r| ~ 0.07
    assert generation_noise_seed(0) == 0xD808CC54DCBEC071  # mix(0x67656E6572617465): SplitMix64's output function, as torch's mix64 gives it
    assert 0 <= generation_noise_seed(2**64 - 1) < 2**64


def test_generated_stores_have_the_image_layout_and_describe_themselves(tmp_path):
    gen(tmp_path / "g.zarr", layers=("midblock",), acts=str(tmp_path / "ga.zarr"), shard=4)
    images = zarr.open_group(str(tmp_path / "g.zarr"), mode="r")
    acts = zarr.open_group(str(tmp_path / "ga.zarr"), mode="r")
    for name in ("label", "global_index", "source_row"):
        assert images[name].chunks == (9,), name  # written whole at creation
    for name in ("synset", "class_name", "source_file"):
        assert images[name].chunks == (4,) and acts[name].chunks == (4,), name  # one per shard, by its task
    np.testing.assert_array_equal(images["source_row"][:], np.arange(9))
    assert images.attrs["settings"]["layout"] == LAYOUT_VERSION and images.attrs["classes"]["label"] == [0, 278, 980]
    assert acts["label"].chunks == (9,) and acts.attrs["classes"]["synset"] == list(CLASSES)
    assert "the generator's own input" in acts["midblock"].attrs["description"] and acts["midblock"].attrs["sigma"] == 80.0
    validate_image_store(str(tmp_path / "g.zarr"))
    validate_activation_store(str(tmp_path / "ga.zarr"))
    summary = store_info(str(tmp_path / "g.zarr")).summary.splitlines()
    assert "generator    tiny-random" in summary and not any(line.startswith("files") for line in summary)
    assert acts.attrs["source"]["url"] == str(tmp_path / "g.zarr")  # absolute, as every provenance path
    unfinished = copy_with_group_attrs(str(tmp_path / "ga.zarr"), tmp_path / "unfinished.zarr", {"complete": False})
    assert any("complete: NO (unfinished: re-run the generate command)" in line for line in store_info(unfinished).summary.splitlines())


def test_nan_weights_fail_the_run_and_mark_nothing_complete(tmp_path):
    """D(x) of NaN weights would become black uint8 images: the shard is refused before the conversion."""
    state = build_preset("tiny-random").state_dict()
    state["model.enc.64x64_conv.weight"][0, 0, 0, 0] = float("nan")
    checkpoint = tmp_path / "nan.pt"
    torch.save(state, checkpoint)
    out, acts = tmp_path / "nan.zarr", tmp_path / "nan-acts.zarr"
    fwd = ForwardSettings(ModelSpec(checkpoint=str(checkpoint)), ("midblock",), storage_dtype="float32")
    options = GenerateOptions(str(out), fwd, per_class=2, classes=CLASSES, activations_out=str(acts), run=RunOptions(batch_size=4, device="cpu", shard_size=4))
    with pytest.raises(IntegrityError, match=r"NaN/Inf in the generator's D\(x\).*first bad sample 0;.*image: samples \[0, 1, 2") as err:
        generate(options)
    assert str(out) in str(err.value) and "\n" not in str(err.value)
    for url in (out, acts):
        group = zarr.open_group(str(url), mode="r", use_consolidated=False)
        assert group.attrs["complete"] is False and not group[DONE_ARRAY][:].any()
    with pytest.raises(Exception, match="not complete"):
        validate_image_store(str(out))


def test_classes_beyond_the_network_are_refused_before_any_output(tmp_path):
    """A 10-class generator asked for ImageNet's kit fox (278): one line before a store exists (an IndexError
    mid-run, after both stores were made, before)."""
    from extractor.store_attrs import LabelRangeError
    from tests.support.stand_in import StandInNetwork, serving

    network = StandInNetwork({"a": (4, 8, 8)}, {"b": (4, 8, 8)})
    network.label_dim = 10
    fwd = ForwardSettings(model=ModelSpec(preset="tiny-random"), layers=())
    with serving(network), pytest.raises(LabelRangeError, match=r"^generate: ImageNet class 278 is beyond the 10 classes this network is conditioned on \(labels 0..9\); select classes within them \(--classes\)$"):
        generate(GenerateOptions(str(tmp_path / "g.zarr"), fwd, per_class=2, classes=("n02119789",), run=RunOptions(4, "cpu")))
    assert not (tmp_path / "g.zarr").exists()


def test_a_checkpoint_without_its_class_embedding_makes_samples_of_no_class(tmp_path, monkeypatch):
    """A class-conditional checkpoint that lacks model.map_label.weight loads as an unconditional network: its
    samples are labelled -1 (not with classes it never saw), and --per-class/--classes are refused before any
    output exists. A generated store's source is the checkpoint file, absolute, with its size."""
    from extractor import api
    from extractor.generation import ExtractionError

    monkeypatch.chdir(tmp_path)
    state = build_preset("tiny-random").state_dict()
    torch.save(state, "conditional.pt")
    torch.save({k: v for k, v in state.items() if "map_label" not in k}, "unconditional.pt")
    with pytest.raises(ExtractionError, match=r"unconditional\.pt: an unconditional network .* use --num-samples N\. .*lacks model\.map_label\.weight"):
        api.generate("refused.zarr", checkpoint="unconditional.pt", per_class=1, classes=["tench"], device="cpu")
    assert not (tmp_path / "refused.zarr").exists()
    api.generate("free.zarr", checkpoint="unconditional.pt", num_samples=3, device="cpu")
    free = zarr.open_group("free.zarr", mode="r")
    np.testing.assert_array_equal(free["label"][:], [-1, -1, -1])
    assert "one-hot" not in free.attrs["sampling"]
    api.generate("classes.zarr", checkpoint="conditional.pt", per_class=1, classes=["tench"], device="cpu")
    attrs = zarr.open_group("classes.zarr", mode="r").attrs
    assert "one-hot(label)" in attrs["sampling"]
    assert attrs["sources"][0]["path"] == str(tmp_path / "conditional.pt") and attrs["sources"][0]["size"] == (tmp_path / "conditional.pt").stat().st_size
