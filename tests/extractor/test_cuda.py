"""The CUDA path on a real device: noise bit-identical to the CPU's, fp32 equal to the EDM reference, bf16 within
its stated tolerance, --compile and the automatic batch equal to eager and fixed batches, NaN/Inf found on the
device. Skipped where no CUDA device is present (CI); run on a lent GPU with `pytest tests/extractor/test_cuda.py`."""

import numpy as np
import pytest
import torch
import zarr

from extractor.extraction import ExtractOptions, extract
from extractor.forward import ForwardSettings, PreparedForward, RunOptions
from extractor.integrity import IntegrityError
from extractor.models import EDMPrecond, LoadedModel, ModelSpec
from extractor.shard_forward import ShardForward
from extractor.noise import NoiseGenerator, sqrt_correctly_rounded_
from extractor.selection import SelectionSpec
from tests.support.stand_in import StandInNetwork, serving
from tests.support.tolerances import BF16_LAYER_TOLERANCE, BF16_OUTPUT_TOLERANCE

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA device")

PRESET = ModelSpec(preset="tiny-random")
LAYERS = ("encoder_bottleneck", "midblock", "model.enc.32x32_block0")


def as_bits(t: torch.Tensor) -> torch.Tensor:
    return t.detach().cpu().contiguous().view(torch.int32)


@pytest.mark.parametrize("shape", [(3, 64, 64), (3, 5, 5)])
def test_noise_is_bit_identical_on_cpu_and_cuda(shape):
    rng = np.random.default_rng(0)
    cases = [(0, np.arange(512)), (12345, rng.integers(0, 1_281_167, 256)), (2**64 - 1, rng.integers(0, 2**63 - 1, 64, dtype=np.int64))]
    for seed, index in cases:
        cpu = NoiseGenerator(seed, shape, "cpu")(index)
        cuda = NoiseGenerator(seed, shape, "cuda")(index)
        assert torch.equal(as_bits(cpu), as_bits(cuda)), (seed, shape)


def test_sqrt_is_correctly_rounded_on_cuda():
    rng = np.random.default_rng(1)
    values = np.concatenate([
        rng.uniform(0, 50, 500_000).astype(np.float32),
        rng.integers(0, 0x7F800000, 500_000, dtype=np.uint32).view(np.float32),
        np.array([0.0, 1e-45, 1.2e-38, 1.0, np.finfo(np.float32).max], dtype=np.float32),
    ])
    x = torch.from_numpy(values.copy()).cuda()
    wide = torch.empty(x.shape, dtype=torch.float64, device="cuda")
    sqrt_correctly_rounded_(x, wide, torch.empty_like(wide), torch.empty_like(x))
    want = np.sqrt(values.astype(np.float64)).astype(np.float32)
    np.testing.assert_array_equal(x.cpu().numpy().view(np.uint32), want.view(np.uint32))


@pytest.mark.parametrize("compute_dtype", ["fp32", "bf16"])
def test_edm_reference_fixture_on_cuda(edm_reference, compute_dtype):
    """fp32 is IEEE float32 on CUDA too (no TF32 convolutions): the reference within the CPU test's tolerance."""
    ref = edm_reference
    model = EDMPrecond(**ref["config"]).eval()
    model.load_state_dict(ref["state_dict"])
    model.cuda()
    layers = tuple(ref["module_order"])
    fwd = ForwardSettings(PRESET, layers, compute_dtype=compute_dtype)
    loaded = LoadedModel(model, "edm reference fixture", ref["config"], False, "", model.img_resolution, model.label_dim)
    with PreparedForward(fwd, "cuda", model.img_resolution, network=loaded) as forward:
        acts, out = forward.run(ref["x"].cuda(), ref["class_labels"].cuda(), need_output=True, sigma=ref["sigma"].cuda())
    for path in layers:
        got, want = acts[path].float().cpu(), ref["activations"][path]
        if compute_dtype == "fp32":
            torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5, msg=path)
        else:
            assert (got - want).abs().max() <= BF16_LAYER_TOLERANCE * want.abs().max(), path
    if compute_dtype == "fp32":
        torch.testing.assert_close(out.cpu(), ref["out"], rtol=1e-4, atol=1e-5)
    else:
        assert (out.cpu() - ref["out"]).abs().max() <= BF16_OUTPUT_TOLERANCE * ref["out"].abs().max()


def run_extraction(store: str, out: str, device: str, compute: str = "fp32", batch: int | None = 32, compile_blocks: bool = False, n: int = 96) -> zarr.Group:
    fwd = ForwardSettings(PRESET, LAYERS, storage_dtype="float32", compute_dtype=compute, reconstructions=True)
    extract(ExtractOptions(store, out, fwd, SelectionSpec(num_samples=n), RunOptions(batch_size=batch, device=device, shard_size=64, compile=compile_blocks)))
    return zarr.open_group(out, mode="r")


@pytest.fixture(scope="module")
def cpu_reference(image_store, tmp_path_factory):
    return run_extraction(image_store, str(tmp_path_factory.mktemp("ref") / "cpu.zarr"), "cpu")


def assert_close_to(reference: zarr.Group, got: zarr.Group, rtol: float = 1e-4, atol: float = 1e-5) -> None:
    for name in LAYERS:
        np.testing.assert_allclose(got[name][:], reference[name][:], rtol=rtol, atol=atol, err_msg=name)
    # D(x) as uint8 truncates: a value on a boundary may land one step apart
    assert np.abs(got["reconstruction"][:].astype(int) - reference["reconstruction"][:]).max() <= 1


def test_noised_cuda_extraction_equals_cpu(image_store, cpu_reference, tmp_path):
    """Device noise, pinned buffers, the copy stream, device checks and casts: the CPU's values."""
    assert_close_to(cpu_reference, run_extraction(image_store, str(tmp_path / "cuda.zarr"), "cuda"))


def test_bf16_extraction_within_tolerance(image_store, cpu_reference, tmp_path):
    got = run_extraction(image_store, str(tmp_path / "bf16.zarr"), "cuda", compute="bf16")
    for name in LAYERS:
        want = cpu_reference[name][:]
        assert np.abs(got[name][:] - want).max() <= BF16_LAYER_TOLERANCE * np.abs(want).max(), name


def test_automatic_batch_equals_fixed(image_store, cpu_reference, tmp_path):
    with PreparedForward(ForwardSettings(PRESET, LAYERS, storage_dtype="float32", compute_dtype="fp32", reconstructions=True), "cuda", 64) as forward:
        batch = forward.batch_size
    assert batch >= 64 and batch & (batch - 1) == 0
    assert_close_to(cpu_reference, run_extraction(image_store, str(tmp_path / "auto.zarr"), "cuda", batch=None))


def test_host_buffers_are_pinned():
    with PreparedForward(ForwardSettings(PRESET, ("encoder_bottleneck",)), "cuda", 64) as forward:
        runner = ShardForward(forward, 8, "reconstruction")
        try:
            assert all(t.is_pinned() for t in runner.host.values())
        finally:
            runner.release()


def test_nonfinite_values_found_on_the_device(image_store, tmp_path):
    network = StandInNetwork({"a": (4, 8, 8)}, {"b": (4, 8, 8)}, value=70000.0)  # finite in float32, Inf in float16
    fwd = ForwardSettings(PRESET, ("encoder_bottleneck",))
    with serving(network), pytest.raises(IntegrityError, match=r"NaN/Inf.*encoder_bottleneck: samples \[0, 1, 2"):
        extract(ExtractOptions(image_store, str(tmp_path / "nan.zarr"), fwd, SelectionSpec(num_samples=32), RunOptions(batch_size=16, device="cuda", shard_size=32)))


# Last: the first compiled batches pay for compiling every block.
def test_compiled_blocks_equal_eager(image_store, cpu_reference, tmp_path):
    assert_close_to(cpu_reference, run_extraction(image_store, str(tmp_path / "compiled.zarr"), "cuda", compile_blocks=True), rtol=1e-3, atol=1e-4)


def test_a_later_eager_run_undoes_compiled_blocks():
    """One process, one cached model: --compile, then a run without it gets the eager forwards and NCHW weights."""
    from extractor.forward import prepare_module
    from extractor.models.registry import PRESETS

    module = EDMPrecond(**PRESETS["tiny-random"]).to("cuda")
    blocks = [*module.model.enc.values(), *module.model.dec.values()]
    prepare_module(module, "cuda", compile_blocks=True)
    assert all("forward" in block.__dict__ for block in blocks)
    prepare_module(module, "cuda", compile_blocks=False)
    assert not any("forward" in block.__dict__ for block in blocks)
    assert all(p.is_contiguous() for p in module.parameters())
