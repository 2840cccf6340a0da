"""The one forward path of extract and generate: a batch through the network, checked and cast on the device.

A task's samples go through `ShardForward` batch by batch. Per batch, on the compute device: the input (for
diffusion networks x = uint8/127.5 − 1 and/or σ·`extractor.noise` noise; feature networks get the clean image as
float 0..255 and preprocess it themselves), the forward with hooks (under the per-device lock, and only it), pooling,
the cast to the storage dtype and a per-sample NaN/Inf flag. The results then land in shard-sized host buffers:
on CPU the cast writes straight into them; on CUDA they are pinned and filled by non-blocking copies on a copy
stream, so the copy of one batch overlaps the next batch's compute. Whoever consumes the buffers (the shard
writer) is told, per batch, when its rows are final.
"""

from __future__ import annotations

import contextlib
import math
import numbers
import re
import threading
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field, replace
from typing import Any

import numpy as np
import torch

from extractor import cast_cpu, noise_cpu
from extractor.models import (
    SMALLEST_TRAINING_SIGMA,
    LoadedModel,
    ModelSpec,
    autocast_context,
    capture_layers,
    is_feature_network,
    resolve_compute_dtype,
)
from extractor.noise import NoiseGenerator
from schemas.activation_store import DIFFUSION_KIND, FEATURE_KIND
from schemas.vocabulary import POOL_MODES, STORAGE_DTYPES
from schemas.errors import ImzarrError
from schemas.task_runner import SchedulerSpec

AUTO = "auto"
CPU_BATCH_SIZE = 64
# Largest batch picked from free CUDA memory; and the share of free memory a batch may plan to use.
MAX_AUTO_BATCH = 1024
# Feature networks: at most this many per automatic batch (a batch size FID / FD_DINOv2 evaluations commonly use).
MAX_AUTO_FEATURE_BATCH = 256
FREE_MEMORY_SHARE = 0.5
# What a diffusion network gets when the user names no σ or seed: the generator's own σ, and seed 0.
DEFAULT_SIGMA = 80.0
DEFAULT_NOISE_SEED = 0
FEATURE_INPUT_REFUSAL = "feature networks see the clean image; σ and noise belong to diffusion networks"
# The largest σ taken: the preconditioning computes σ² in float32 (finite below ~1.8e19); EDM/DMD2 train on
# σ in 0.002..80, so anything near this bound is far outside what the networks have seen.
LARGEST_SIGMA = 1e18
# What --device takes: torch's CPU, CUDA and CUDA:N devices (other backends are not supported here).
DEVICE_NAME = re.compile(r"auto|cpu|cuda(:[0-9]+)?")


class ExtractionError(ImzarrError):
    """Bad extraction settings, or values that failed the integrity pass."""


@dataclass(frozen=True)
class ForwardSettings:
    """Everything that decides the numbers for one sample (part of the settings fingerprint)."""

    model: ModelSpec
    layers: tuple[str, ...]
    sigma: float | None = None  # None: not given; diffusion networks then get DEFAULT_SIGMA, feature networks none
    noise_seed: int | None = None  # None: not given; diffusion networks with noise then get DEFAULT_NOISE_SEED
    noise: bool = True  # False: feed the clean image (a diffusion network is still conditioned on σ)
    class_free: bool = False
    pool: str = "none"
    storage_dtype: str = "float16"
    compute_dtype: str = AUTO  # auto: bf16 autocast on CUDA for diffusion networks, fp32 otherwise
    reconstructions: bool = False

    def __post_init__(self) -> None:
        check_forward_settings(self)  # whoever builds the settings (CLI, API, features) gets the same refusals

    @property
    def noised(self) -> bool:
        """Is noise added to the input? (Resolved settings only: `resolve_forward` sets noise_seed exactly then.)"""
        return self.noise_seed is not None


@dataclass(frozen=True)
class RunOptions:
    """How a run executes, shared by extract and generate; none of it changes a stored value."""

    batch_size: int | None = None  # None: 64 on CPU, from free device memory on CUDA
    device: str = AUTO
    scheduler: SchedulerSpec = field(default_factory=SchedulerSpec)
    overwrite: bool = False
    shard_size: int | None = None  # samples per output shard (= per task)
    compile: bool = False  # torch.compile the network's blocks (CUDA; first batches pay the compile)

    def __post_init__(self) -> None:
        check_device_name(self.device)
        for option, value in (("--batch-size", self.batch_size), ("--shard-size", self.shard_size)):
            if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
                raise ExtractionError(f"{option} {value!r}: must be a whole number ≥ 1")


def check_device_name(device: object) -> None:
    """Refuse a device name this project does not run on (before torch is asked about it)."""
    if not isinstance(device, str) or not DEVICE_NAME.fullmatch(device):
        raise ExtractionError(f"--device {device!r}: choose auto, cpu, cuda or cuda:N")


def resolve_device(device: str) -> str:
    """`auto` → cuda when available, else cpu; refuse CUDA where there is none."""
    check_device_name(device)
    if device == AUTO:
        return "cuda" if torch.cuda.is_available() else "cpu"
    if device.startswith("cuda") and not torch.cuda.is_available():
        raise ExtractionError(f"--device {device}: CUDA is not available on this machine (use cpu or auto)")
    return device


def check_compute_on_device(fwd: ForwardSettings, device: str) -> None:
    """fp16/bf16 autocast is a CUDA feature here; refuse it on the CPU before anything is written."""
    if fwd.compute_dtype not in (AUTO, "fp32") and not device.startswith("cuda"):
        raise ExtractionError(f"--compute-dtype {fwd.compute_dtype}: needs a CUDA device (this run is on the CPU); use fp32")


def resolve_compute(fwd: ForwardSettings, device: str, kind: str = DIFFUSION_KIND) -> ForwardSettings:
    """Settings with `compute_dtype` auto replaced by what runs: bf16 on CUDA for diffusion networks, else fp32.

    Feature networks run in fp32 by default: the FID and FD_DINOv2 protocols are defined in fp32."""
    if fwd.compute_dtype != AUTO:
        return fwd
    return replace(fwd, compute_dtype="bf16" if device.startswith("cuda") and kind == DIFFUSION_KIND else "fp32")


def resolve_forward(fwd: ForwardSettings, loaded: LoadedModel, device: str, seed_picks_samples: bool = False) -> ForwardSettings:
    """The settings that run on this network: defaults filled in, options it cannot take refused (one line each).

    Diffusion networks: σ = DEFAULT_SIGMA and seed DEFAULT_NOISE_SEED where not given; noise_seed None exactly
    when no noise is added. Feature networks: no σ, no noise, no class labels, no D(x); compute fp32 on auto. One
    `--seed` serves noise and per-class sampling: for a feature network it is accepted only where it picks samples
    (`seed_picks_samples`), and is no noise seed there.
    """
    if loaded.kind == FEATURE_KIND:
        given = [
            (fwd.sigma is not None, f"--sigma {fwd.sigma}: {FEATURE_INPUT_REFUSAL}"),
            (fwd.noise_seed is not None and not seed_picks_samples,
             f"--seed {fwd.noise_seed} without --per-class (for a feature network a seed only picks --per-class samples): {FEATURE_INPUT_REFUSAL}"),
            (fwd.class_free, "--class-free: feature networks take no class labels (only diffusion networks are conditioned on them)"),
            (fwd.reconstructions, "--reconstructions: feature networks return features, not a denoised image D(x)"),
        ]
        for refused, message in given:
            if refused:
                raise ExtractionError(f"{message} ({loaded.name} is a feature network)")
        return resolve_compute(replace(fwd, sigma=None, noise_seed=None, noise=False), device, FEATURE_KIND)
    sigma = DEFAULT_SIGMA if fwd.sigma is None else float(fwd.sigma)
    seed = (DEFAULT_NOISE_SEED if fwd.noise_seed is None else fwd.noise_seed) if fwd.noise else None
    return resolve_compute(replace(fwd, sigma=sigma, noise_seed=seed), device, DIFFUSION_KIND)


def check_forward_settings(fwd: ForwardSettings) -> None:
    """Refuse settings no forward can honour, each with a one-line reason (σ is checked where there is one)."""
    if fwd.sigma is not None:
        if isinstance(fwd.sigma, bool) or not isinstance(fwd.sigma, numbers.Real):
            raise ExtractionError(f"--sigma {fwd.sigma!r}: σ must be a number")
        if not fwd.sigma > 0:
            raise ExtractionError(
                f"--sigma {fwd.sigma}: σ must be > 0 (ln σ conditions the network; σ = 0 gives NaN everywhere); "
                f"for a nearly clean input use a small σ such as {SMALLEST_TRAINING_SIGMA}"
            )
        if not math.isfinite(fwd.sigma) or fwd.sigma > LARGEST_SIGMA:
            raise ExtractionError(
                f"--sigma {fwd.sigma}: σ must be at most {LARGEST_SIGMA:g} (σ² must be finite in float32); "
                "the networks are trained on σ up to 80"
            )
    repeated = sorted({name for name in fwd.layers if fwd.layers.count(name) > 1})
    if repeated:
        raise ExtractionError(f"--layers {','.join(fwd.layers)!r}: {repeated[0]!r} is given twice")
    if fwd.pool not in POOL_MODES:
        raise ExtractionError(f"--pool {fwd.pool!r}: choose one of {POOL_MODES}")
    if fwd.storage_dtype not in STORAGE_DTYPES:
        raise ExtractionError(f"--dtype {fwd.storage_dtype!r}: choose one of {STORAGE_DTYPES}")
    if fwd.compute_dtype != AUTO:
        try:
            resolve_compute_dtype(fwd.compute_dtype)
        except ValueError as exc:
            raise ExtractionError(str(exc)) from None


# One lock per device and process: hooks live on the shared module, and two CPU forwards would only fight for cores.
_LOCKS: dict[str, threading.Lock] = {}
_LOCKS_GUARD = threading.Lock()


def model_lock(device: str) -> threading.Lock:
    """The lock every forward on `device` in this process holds (and only the forward)."""
    with _LOCKS_GUARD:
        return _LOCKS.setdefault(str(torch.device(device)), threading.Lock())


_IEEE_GUARD = threading.Lock()
_ieee_users = 0
_precision_before = True


@contextlib.contextmanager
def ieee_float32_convolutions(device: str) -> Iterator[None]:
    """fp32 compute means IEEE float32 on CUDA too: torch lets cuDNN convolutions round their float32 operands to
    TF32 (10-bit mantissa) by default, which moves activations by ~1e-3 relative. The setting is process-wide, so
    it is counted: the first forward in sets it, the last one out restores what was there. Through the long-standing
    `torch.backends.cudnn.allow_tf32`: setting only the newer per-operator flag left the two out of step, and any
    code reading `allow_tf32` meanwhile got a RuntimeError."""
    global _ieee_users, _precision_before
    if not device.startswith("cuda"):
        yield
        return
    cudnn = torch.backends.cudnn
    with _IEEE_GUARD:
        if _ieee_users == 0:
            _precision_before = cudnn.allow_tf32
            cudnn.allow_tf32 = False
        _ieee_users += 1
    try:
        yield
    finally:
        with _IEEE_GUARD:
            _ieee_users -= 1
            if _ieee_users == 0:
                cudnn.allow_tf32 = _precision_before


# (module id, device) → whether its blocks are compiled now: a later run with the other setting switches it back.
_PREPARED: dict[tuple[int, str], bool] = {}


# The weights' memory layout on CUDA, by whether the blocks are compiled (measured on an H200, bf16, full DMD2 to the
# midblock, batch 256: eager ran 24 % faster in NCHW than in channels_last, whose GroupNorm and elementwise kernels
# take slower paths; compiled blocks fuse those and ran at CUDA_LAYOUT[True]'s best).
CUDA_LAYOUT = {False: torch.contiguous_format, True: torch.channels_last}


def prepare_module(module: torch.nn.Module, device: str, compile_blocks: bool = False) -> torch.nn.Module:
    """CUDA: the weights in CUDA_LAYOUT's memory format, and optionally each U-Net block's forward compiled; CPU:
    unchanged.

    Feature networks run eagerly: what is compiled is the U-Net's block list (`module.model.enc`/`dec`), which
    they do not have. Every block shares one forward function, and torch compiles a function again for each
    block (and each batch size) until its recompile limit: the limit is raised to cover them all, else the
    blocks past it silently run eagerly."""
    key = (id(module), str(device))
    with _LOCKS_GUARD:
        if _PREPARED.get(key) == compile_blocks or not device.startswith("cuda"):
            return module
        module.to(memory_format=CUDA_LAYOUT[compile_blocks])
        blocks = [] if is_feature_network(module) else [*module.model.enc.values(), *module.model.dec.values()]
        if not compile_blocks:
            for block in blocks:
                block.__dict__.pop("forward", None)  # the class's eager forward again
        else:
            import torch._dynamo  # loaded by torch.compile anyway; imported here for its config

            dynamo_config = torch._dynamo.config
            # Up to five batch sizes per block: the layer probe's (1), the memory probe's (8), the run's, a shard's
            # tail and the last shard's tail (each new size compiles every block again, ~25 s for DMD2 on an H200).
            needed = 5 * len(blocks) + 5
            dynamo_config.recompile_limit = max(dynamo_config.recompile_limit, needed)
            dynamo_config.accumulated_recompile_limit = max(dynamo_config.accumulated_recompile_limit, needed)
            for block in blocks:
                # The block's forward, not the module call: capture hooks stay outside the compiled graph.
                block.forward = torch.compile(block.forward, dynamic=False)
        _PREPARED[key] = compile_blocks
    return module


def auto_batch_size(per_sample_bytes: int, device: str, largest: int = MAX_AUTO_BATCH) -> int:
    """64 on CPU; on CUDA the largest power of two ≤ `largest` whose planned memory fits a share of the free memory."""
    if not device.startswith("cuda"):
        return CPU_BATCH_SIZE
    free, _total = torch.cuda.mem_get_info(torch.device(device))
    fit = int(free * FREE_MEMORY_SHARE) // max(per_sample_bytes, 1)
    return int(min(largest, max(1, 1 << (max(fit, 1).bit_length() - 1))))


def measured_bytes_per_sample(module: torch.nn.Module, fwd: ForwardSettings, resolution: int, label_dim: int, device: str, probe: int = 8) -> int:
    """CUDA memory one sample takes through the forward (peak over a `probe`-sample batch, per sample)."""
    dev = torch.device(device)
    torch.cuda.synchronize(dev)
    before = torch.cuda.memory_allocated(dev)
    torch.cuda.reset_peak_memory_stats(dev)
    x = torch.zeros(probe, 3, resolution, resolution, device=device)
    one_hot = torch.zeros(probe, label_dim, device=device) if label_dim else None
    forward_batch(module, x, one_hot, fwd, device, need_output=fwd.reconstructions or not fwd.layers)
    torch.cuda.synchronize(dev)
    return max(1, (torch.cuda.max_memory_allocated(dev) - before) // probe)


def one_hot_labels(labels: np.ndarray, label_dim: int, device: str, class_free: bool = False) -> torch.Tensor:
    """One-hot rows for labels ≥ 0; unknown labels (-1) and class-free runs get zero rows."""
    one_hot = torch.zeros(labels.shape[0], label_dim, device=device)
    if not class_free and label_dim:
        known = np.flatnonzero(labels >= 0)
        one_hot[torch.from_numpy(known).to(device), torch.from_numpy(labels[known].astype(np.int64)).to(device)] = 1
    return one_hot


def to_uint8_images(d: torch.Tensor) -> torch.Tensor:
    """DMD2's own conversion of D(x) to images: clamp((D + 1) · 127.5), then truncate (not round)."""
    return ((d.float() + 1) * 127.5).clamp(0, 255).to(torch.uint8)


# Per float dtype: the integer view, the mask clearing the sign bit, and the bits of +Inf. A value is Inf or NaN
# exactly when its sign-cleared bits are ≥ those of +Inf (exponent all ones).
_MAGNITUDE_BITS = {
    torch.float16: (torch.int16, 0x7FFF, 0x7C00),
    torch.bfloat16: (torch.int16, 0x7FFF, 0x7F80),
    torch.float32: (torch.int32, 0x7FFFFFFF, 0x7F800000),
}


def nonfinite_rows(values: torch.Tensor, scratch: torch.Tensor | None = None) -> torch.Tensor:
    """Per-sample bool: does the row hold NaN or Inf? Exact, from the bits: one masking pass and one integer max.

    `scratch` (uint8, at least values' bytes, on its device) takes the masked bits; without it they are allocated.
    On CPU this ran 2.5× faster than a float max and min on float16 (measured); other dtypes use max and min,
    which propagate NaN (+Inf can only hide from the min, −Inf from the max).
    """
    flat = values.reshape(values.shape[0], -1)
    spec = _MAGNITUDE_BITS.get(values.dtype)
    if spec is None:
        return ~(torch.isfinite(flat.amax(dim=1)) & torch.isfinite(flat.amin(dim=1)))
    int_dtype, sign_cleared, inf_bits = spec
    bits = flat.view(int_dtype)
    if scratch is None:
        magnitudes = bits & sign_cleared
    else:
        magnitudes = torch.bitwise_and(bits, sign_cleared, out=scratch[: flat.numel() * flat.element_size()].view(int_dtype).view(flat.shape))
    return magnitudes.amax(dim=1) >= inf_bits


def forward_batch(
    module: torch.nn.Module,
    x: torch.Tensor,
    one_hot: torch.Tensor | None,
    fwd: ForwardSettings,
    device: str,
    need_output: bool,
    sigma: torch.Tensor | None = None,
) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
    """The network on one prepared input batch: ({layer: activation}, network output or None), on the device.

    Diffusion networks: σ is `fwd.sigma` (DEFAULT_SIGMA when unset) for every sample unless given per sample, and
    the output is D(x). Feature networks take `x` (float 0..255 images) alone; their output is what their forward
    returns. Only this holds the per-device lock; pooling happens inside (capture_layers), on the device.
    """
    feature = is_feature_network(module)
    if sigma is None and not feature:
        sigma = torch.full((x.shape[0],), DEFAULT_SIGMA if fwd.sigma is None else fwd.sigma, device=device)
    precision = ieee_float32_convolutions(device) if resolve_compute_dtype(fwd.compute_dtype) == torch.float32 else contextlib.nullcontext()
    with torch.inference_mode(), autocast_context(device, fwd.compute_dtype), precision, model_lock(device):
        if fwd.layers:
            acts, out = capture_layers(module, x, sigma, one_hot, list(fwd.layers), fwd.pool, need_output=need_output)
        else:
            acts, out = {}, (module(x) if feature else module(x, sigma, one_hot))
    return acts, out


ReadyCallback = Callable[[int, int, Callable[[], None] | None], None]


class ReusePool:
    """Objects (shard buffers, noise generators, input scratch) handed from task to task within a process.

    Fresh memory is slow to touch (page faults: ~0.5 GB/s on the CPU machines, measured), pinned memory slow to
    allocate: a 100 MB shard buffer made per task capped the write path at that rate. Keys say what fits.
    """

    def __init__(self) -> None:
        self._free: dict[tuple, list[Any]] = {}
        self._guard = threading.Lock()

    def take(self, key: tuple, make: Callable[[], Any]) -> Any:
        with self._guard:
            free = self._free.get(key)
            if free:
                return free.pop()
        return make()

    def give(self, key: tuple, value: Any) -> None:
        with self._guard:
            self._free.setdefault(key, []).append(value)


REUSE = ReusePool()


def _scratch_key(tensor: torch.Tensor, device: str) -> tuple:
    return ("scratch", tuple(tensor.shape), tensor.dtype, device)


def _host_buffer_key(shape: tuple[int, ...], dtype: torch.dtype, pinned: bool) -> tuple:
    return ("host", shape, dtype, pinned)


class ShardForward:
    """One task's samples through the network into shard-sized host buffers, batch by batch.

    `buffers[name]` ([count, *shape], storage dtype; uint8 for `output_name`, the network's D(x) as images) are
    filled in place; after each batch `on_ready(first, stop, wait)` says rows [first, stop) are final once `wait()`
    returns (None: already). `nonfinite()` gives the NaN/Inf rows per layer and of D(x) (checked before its uint8
    conversion, which would turn NaN into black pixels), as positions offset by `start`. `resolution` is the
    side of the images fed in (the image store's; feature networks resize them themselves).
    """

    def __init__(
        self,
        loaded: Any,
        fwd: ForwardSettings,
        device: str,
        count: int,
        layer_shapes: dict[str, tuple[int, ...]],
        output_name: str | None,
        on_ready: ReadyCallback | None = None,
        resolution: int | None = None,
    ):
        self.loaded, self.fwd, self.device, self.count = loaded, fwd, device, count
        self.output_name = output_name
        self.on_ready = on_ready
        self.device_type = torch.device(device).type
        self.cuda = self.device_type == "cuda"
        self.feature = loaded.kind == FEATURE_KIND
        self.storage = getattr(torch, fwd.storage_dtype)
        res = loaded.resolution if resolution is None else resolution
        self.image_shape = (3, res, res)
        shapes = {name: (tuple(layer_shapes[name]), self.storage) for name in fwd.layers}
        if output_name is not None:
            shapes[output_name] = (self.image_shape, torch.uint8)
        # Pinned on CUDA: the only host memory a non-blocking device→host copy really overlaps with.
        self._keys = {name: _host_buffer_key((count, *shape), dtype, self.cuda) for name, (shape, dtype) in shapes.items()}
        self.host = {
            name: REUSE.take(key, lambda key=key: torch.empty(key[1], dtype=key[2], pin_memory=key[3])) for name, key in self._keys.items()
        }
        self.buffers = {name: t.numpy() for name, t in self.host.items()}
        checked = [*fwd.layers, *([output_name] if output_name is not None else [])]
        self.flags = {name: torch.zeros(count, dtype=torch.bool, device=device) for name in checked}
        self._noise_key = ("noise", fwd.noise_seed, self.image_shape, device)
        self.noise = None if fwd.noise_seed is None else REUSE.take(self._noise_key, lambda: NoiseGenerator(fwd.noise_seed, self.image_shape, device))
        self.copy_stream = torch.cuda.Stream(device=device) if self.cuda else None
        self._scratch_tensors: dict[str, torch.Tensor] = {}

    def release(self) -> None:
        """Hand the buffers on to the next task; call once nothing reads them any more (after the shard write)."""
        for name, key in self._keys.items():
            REUSE.give(key, self.host[name])
        if self.noise is not None:
            REUSE.give(self._noise_key, self.noise)
        for tensor in self._scratch_tensors.values():
            REUSE.give(_scratch_key(tensor, self.device), tensor)
        self.host, self.buffers, self.noise, self._scratch_tensors = {}, {}, None, {}

    def _scratch(self, name: str, n: int) -> torch.Tensor:
        """A float32 [n, 3, H, W] tensor on the device, reused batch to batch (and task to task)."""
        return self._reused(name, (n, *self.image_shape), torch.float32)

    def _check_scratch(self, values: torch.Tensor) -> torch.Tensor | None:
        """Bytes for nonfinite_rows' masked bits on CPU (fresh memory is slow to touch); None on CUDA, whose
        caching allocator makes temporaries cheap."""
        return None if self.cuda else self._reused("check", (values.numel() * values.element_size(),), torch.uint8)

    def _reused(self, name: str, shape: tuple[int, ...], dtype: torch.dtype) -> torch.Tensor:
        """A work tensor on the device with at least `shape[0]` rows, kept by name and handed on through REUSE."""
        tensor = self._scratch_tensors.get(name)
        if tensor is None or tensor.shape[0] < shape[0]:
            if tensor is not None:
                REUSE.give(_scratch_key(tensor, self.device), tensor)
            tensor = REUSE.take(("scratch", shape, dtype, self.device), lambda: torch.empty(shape, dtype=dtype, device=self.device))
            self._scratch_tensors[name] = tensor
        return tensor[: shape[0]]

    def input_batch(self, images: torch.Tensor | None, global_index: np.ndarray) -> torch.Tensor:
        """On the device: x = uint8/127.5 − 1 (+ σ·noise), or σ·noise alone without images (generation); for a
        feature network the images as float32 0..255 (it does its own preprocessing)."""
        n = global_index.shape[0]
        x = self._scratch("input", n)
        if images is None:
            if self.noise is None:
                raise ExtractionError("generation needs a seed for its noise")
            return self.noise(global_index, out=x).mul_(self.fwd.sigma)
        noise = None if self.noise is None else self.noise(global_index, out=self._scratch("noise", n))  # None: feature networks
        if self.device_type == "cpu" and not self.feature:  # one pass instead of five over the batch, same bits
            noise_cpu.noised_input(images.numpy(), None if noise is None else noise.numpy(), self.fwd.sigma or 0.0, x.numpy())
            return x
        x.copy_(images.to(self.device, non_blocking=True))
        if self.feature:
            return x
        x.div_(127.5).sub_(1.0)
        if noise is not None:
            x.add_(noise.mul_(self.fwd.sigma))
        return x

    def run(self, first: int, images: torch.Tensor | None, labels: np.ndarray, global_index: np.ndarray) -> None:
        """Rows [first, first + len(labels)): forward, check and cast on the device, then into the host buffers."""
        stop = first + labels.shape[0]
        x = self.input_batch(images, global_index)
        one_hot = None if self.feature else one_hot_labels(labels, self.loaded.label_dim, self.device, self.fwd.class_free)
        acts, out = forward_batch(self.loaded.module, x, one_hot, self.fwd, self.device, need_output=self.output_name is not None)
        results = {name: acts[name] for name in self.fwd.layers}
        if self.output_name is not None:
            self.flags[self.output_name][first:stop] = nonfinite_rows(out, self._check_scratch(out))  # before uint8 makes NaN black
            results[self.output_name] = to_uint8_images(out)
        if not self.cuda:
            for name, value in results.items():
                target = self.host[name][first:stop]  # the storage-dtype cast goes straight into the shard buffer
                if name == self.output_name:
                    target.copy_(value)
                elif value.dtype == torch.float32 and target.dtype == torch.float16:  # the default: one pass
                    self.flags[name][first:stop] = torch.from_numpy(cast_cpu.cast_to_float16(value.contiguous().numpy(), target.numpy()))
                else:
                    target.copy_(value)
                    self.flags[name][first:stop] = nonfinite_rows(target, self._check_scratch(target))
            if self.on_ready is not None:
                self.on_ready(first, stop, None)
            return
        staged = {}
        for name, value in results.items():
            # contiguous (NCHW) like the host buffer: channels_last outputs would otherwise copy twice
            cast = value.to(self.host[name].dtype, memory_format=torch.contiguous_format)
            if name != self.output_name:
                self.flags[name][first:stop] = nonfinite_rows(cast)
            staged[name] = cast
        computed = torch.cuda.current_stream(self.device).record_event()
        with torch.cuda.stream(self.copy_stream):
            self.copy_stream.wait_event(computed)
            for name, cast in staged.items():
                self.host[name][first:stop].copy_(cast, non_blocking=True)
                cast.record_stream(self.copy_stream)  # the allocator must not reuse it before the copy ran
            copied = self.copy_stream.record_event()
        if self.on_ready is not None:
            self.on_ready(first, stop, copied.synchronize)

    def finish(self) -> None:
        """Wait until every copy into the host buffers has landed."""
        if self.cuda:
            self.copy_stream.synchronize()

    def nonfinite(self, start: int) -> dict[str, list[int]]:
        """{layer or output name: sample positions (start + row)} of rows holding NaN or Inf."""
        found = {}
        for name, flags in self.flags.items():
            rows = torch.nonzero(flags).flatten().cpu().numpy()
            if rows.size:
                found[name] = (start + rows).tolist()
        return found


def pinned_images(images: np.ndarray, device: str) -> torch.Tensor:
    """A task's uint8 images as a tensor; pinned on CUDA so their uploads are non-blocking."""
    tensor = torch.from_numpy(images)
    return tensor.pin_memory() if device.startswith("cuda") else tensor


def per_sample_bytes(layer_shapes: dict[str, tuple[int, ...]], resolution: int, storage_dtype: str) -> int:
    """Device memory per sample besides the forward itself: input and noise scratch (float32), and the cast
    outputs of two batches (one computing while the previous one's copy to the host is in flight)."""
    scratch = 2 * 3 * resolution * resolution * 4
    outputs = sum(int(np.prod(s)) for s in layer_shapes.values()) * np.dtype(storage_dtype).itemsize
    return scratch + 2 * outputs
