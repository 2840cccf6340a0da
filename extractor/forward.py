"""The forward of extract, generate, features and the dry run: its settings, their rules, and PreparedForward.

`ForwardSettings` say what decides the numbers for one sample; `PreparedForward(settings, …)` turns them, once per run,
into the network ready on its device: model loaded (once per process), device and compute dtype resolved and
checked, layer names resolved to module paths and their hooks registered (`extractor.models.LayerCapture`), the
image side checked, layer shapes probed and the batch size chosen. Tasks get the same object in their own process
from a picklable `ForwardPlan`. `extractor.shard_forward` runs a task's batches through it.
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

from extractor.models import (
    SMALLEST_TRAINING_SIGMA,
    LayerCapture,
    LoadedModel,
    ModelSpec,
    autocast_context,
    cached_model,
    is_feature_network,
    resolve_compute_dtype,
)
from extractor.noise import NOISE_RECIPE
from extractor.selection import layer_entries
from schemas.activation_store import DIFFUSION_KIND, FEATURE_KIND
from schemas.vocabulary import COMPUTE_DTYPE_NAMES, POOL_MODES, STORAGE_DTYPES
from schemas.errors import ImzarrError
from schemas.option_values import SEED_64, one_of, shown, whole_numbers
from schemas.store_identity import InputChangedError
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
    """Bad extraction or generation settings (exit code 2)."""


class ComputeDeviceError(ExtractionError):
    """A compute dtype the run's device cannot take: fp16/bf16 autocast needs a CUDA device here."""



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
        # The seed is recorded in JSON: a numpy integer from a notebook becomes an int here.
        object.__setattr__(self, "noise_seed", whole_numbers({"--seed": (self.noise_seed, *SEED_64)}, ExtractionError)["--seed"])
        check_forward_settings(self)  # whoever builds the settings (CLI, API, features) gets the same refusals

    @property
    def noised(self) -> bool:
        """Is noise added to the input? (Resolved settings only: `resolve_forward` sets noise_seed exactly then.)"""
        return self.noise_seed is not None

    def to_dict(self) -> dict[str, Any]:
        """The forward's part of an activation store's settings fingerprint (resolved settings): σ only where the
        network takes one, the noise recipe only where noise is added, so stores made without them keep theirs."""
        settings: dict[str, Any] = {
            "layers": list(self.layers),
            "noise_seed": self.noise_seed,
            "class_free": self.class_free,
            "pool": self.pool,
            "storage_dtype": self.storage_dtype,
            "compute_dtype": self.compute_dtype,
            "reconstructions": self.reconstructions,
        }
        if self.sigma is not None:
            settings["sigma"] = self.sigma
        if self.noised:
            settings["noise_recipe"] = NOISE_RECIPE
        return settings




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
        counts = whole_numbers({"--batch-size": (self.batch_size, 1), "--shard-size": (self.shard_size, 1)}, ExtractionError)
        object.__setattr__(self, "batch_size", counts["--batch-size"])
        object.__setattr__(self, "shard_size", counts["--shard-size"])


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
        raise ComputeDeviceError(f"--compute-dtype {fwd.compute_dtype}: needs a CUDA device (this run is on the CPU); use fp32")



def resolve_compute_device(fwd: ForwardSettings, device: str, compile_blocks: bool = False) -> str:
    """The device `device` names (auto → cuda when available), refusing a compute dtype it cannot run and
    `--compile` off CUDA (the blocks are compiled for CUDA only: on the CPU it would change nothing)."""
    resolved = resolve_device(device)
    check_compute_on_device(fwd, resolved)
    if compile_blocks and not resolved.startswith("cuda"):
        raise ComputeDeviceError("--compile: compiles the U-Net's blocks for CUDA, and this run is on the CPU (where it would change nothing); leave it out")
    return resolved


def resolved_compute_dtype(compute_dtype: str, device: str, kind: str = DIFFUSION_KIND) -> str:
    """`compute_dtype` with auto replaced by what runs: bf16 on CUDA for diffusion networks, else fp32.

    Feature networks run in fp32 by default: the FID and FD_DINOv2 protocols are defined in fp32."""
    if compute_dtype != AUTO:
        return compute_dtype
    return "bf16" if device.startswith("cuda") and kind == DIFFUSION_KIND else "fp32"


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
            (not fwd.noise, "--no-noise: feature networks always take the clean images (there is no noise to leave out)"),
            (fwd.class_free, "--class-free: feature networks take no class labels (only diffusion networks are conditioned on them)"),
            (fwd.reconstructions, "--reconstructions: feature networks return features, not a denoised image D(x)"),
        ]
        for refused, message in given:
            if refused:
                raise ExtractionError(f"{message} ({loaded.name} is a feature network)")
        return replace(fwd, sigma=None, noise_seed=None, noise=False, compute_dtype=resolved_compute_dtype(fwd.compute_dtype, device, FEATURE_KIND))
    sigma = DEFAULT_SIGMA if fwd.sigma is None else float(fwd.sigma)
    seed = (DEFAULT_NOISE_SEED if fwd.noise_seed is None else fwd.noise_seed) if fwd.noise else None
    return replace(fwd, sigma=sigma, noise_seed=seed, compute_dtype=resolved_compute_dtype(fwd.compute_dtype, device, DIFFUSION_KIND))


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
    if fwd.layers:
        layer_entries(fwd.layers)  # an empty name or one given twice: the same refusal as the options builders'
    for option, value, choices in (("--pool", fwd.pool, POOL_MODES), ("--dtype", fwd.storage_dtype, STORAGE_DTYPES), ("--compute-dtype", fwd.compute_dtype, COMPUTE_DTYPE_NAMES)):
        try:
            one_of(value, choices)
        except ValueError as exc:  # the command line's choices, with the same close match
            raise ExtractionError(f"{option} {shown(value)}: {exc}") from None


# One lock per device and process: a LayerCapture collects into one place per module, and two CPU forwards would
# only fight for cores.
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
    it is counted: the first forward in sets it, the last one out restores what was there. It is set through
    `torch.backends.cudnn.allow_tf32`, which torch keeps in step with its per-operator precision flag: setting the
    per-operator flag alone leaves the two disagreeing, and reading `allow_tf32` then raises a RuntimeError."""
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


# The weights' memory layout on CUDA, by whether the blocks are compiled: eager GroupNorm and elementwise kernels take
# slower paths in channels_last, so eager runs NCHW; compiled blocks fuse those kernels and run fastest in
# channels_last (BENCHMARKS.md, "CUDA").
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
            # tail and the last shard's tail (each new size compiles every block again).
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



def per_sample_bytes(layer_shapes: dict[str, tuple[int, ...]], resolution: int, storage_dtype: str) -> int:
    """Device memory per sample besides the forward itself: input and noise scratch (float32), and the cast
    outputs of two batches (one computing while the previous one's copy to the host is in flight)."""
    scratch = 2 * 3 * resolution * resolution * 4
    outputs = sum(int(np.prod(s)) for s in layer_shapes.values()) * np.dtype(storage_dtype).itemsize
    return scratch + 2 * outputs


def check_resolution(loaded: LoadedModel, resolution: int, where: str) -> None:
    """A diffusion network takes one image side only; feature networks resize every input to their own."""
    if loaded.kind != FEATURE_KIND and loaded.resolution != resolution:
        raise ExtractionError(f"{where}: images are {resolution}×{resolution}, the model takes {loaded.resolution}×{loaded.resolution}")


@dataclass(frozen=True)
class ForwardPlan:
    """What a task needs to get the run's PreparedForward in its own process; cheap to pickle (the model is
    named, never shipped)."""

    settings: ForwardSettings  # resolved
    device: str  # as the run was given it: `auto` resolves in each process
    resolution: int  # side of the images fed in
    compile: bool
    layer_shapes: tuple[tuple[str, tuple[int, ...]], ...]
    batch_size: int
    model_sha256: str = ""  # of the weights the run started with: a task never runs others ("" : not checked)

    def key(self) -> tuple:
        return (self.settings, self.device, self.resolution, self.compile)

    def without_layers(self) -> ForwardPlan:
        """The same forward with no capture (a task that writes the network's output only)."""
        return replace(self, settings=replace(self.settings, layers=()), layer_shapes=())


class PreparedForward:
    """One run's network, prepared once: model, device, resolved settings, layer capture, shapes, batch size.

    `run` takes one input batch on the device through the network (under the per-device lock, IEEE float32
    convolutions for fp32, autocast otherwise) and returns the captured layers and the output. The hooks stay on
    the module until `close` (or the end of a `with` block); within the block, tasks in this process that ask
    `for_plan` for this run's plan get this very object.
    """

    def __init__(
        self,
        settings: ForwardSettings,
        device: str = AUTO,
        resolution: int | None = None,
        compile_blocks: bool = False,
        batch_size: int | None = None,
        seed_picks_samples: bool = False,
        where: str = "images",
        check_network: Callable[[LoadedModel], None] | None = None,
        layer_shapes: dict[str, tuple[int, ...]] | None = None,
        network: LoadedModel | None = None,
        settings_resolved: bool = False,
    ):
        """The network for `settings` on `device` (loaded once per process, unless `network` is one loaded
        already), fed images of side `resolution` (None: the network's own); `check_network` may refuse it before
        its settings are resolved, and `seed_picks_samples` is resolve_forward's. `where` names the images in a
        wrong-size refusal; `layer_shapes` are known already where a task rebuilds its run's forward (`for_plan`)."""
        self.device_option, self.compile = device, compile_blocks
        self.device = resolve_compute_device(settings, device)
        self.loaded = cached_model(settings.model, self.device) if network is None else network
        if check_network is not None:
            check_network(self.loaded)
        # A task rebuilding its run's forward (`for_plan`) gets settings resolved already: resolving them again
        # would read the defaults resolution filled in (a feature network's noise=False) as options given.
        self.settings = settings if settings_resolved else resolve_forward(settings, self.loaded, self.device, seed_picks_samples)
        self.resolution = self.loaded.resolution if resolution is None else resolution
        check_resolution(self.loaded, self.resolution, where)
        # Resolution fills in σ, seed and compute dtype; the layers and pool are the caller's as given.
        self.capture = LayerCapture(self.loaded.module, settings.layers, settings.pool) if settings.layers else None
        self.paths: dict[str, str] = {} if self.capture is None else dict(self.capture.paths)
        self._layer_shapes = layer_shapes if layer_shapes is not None or self.capture is not None else {}
        self._batch_size = batch_size
        self._kept = False  # True: built by for_plan and kept for later tasks (closed when dropped)

    @classmethod
    def for_plan(cls, plan: ForwardPlan) -> PreparedForward:
        """This process's PreparedForward for `plan`: the run's own where it runs here, else one built once and
        kept (the last few); its module in the layout (and compiled state) the plan asks for."""
        with _SERVING_GUARD:
            forward = _SERVING.get(plan.key())
            if forward is not None and forward._kept and cached_model(plan.settings.model, forward.device) is not forward.loaded:
                _SERVING.pop(plan.key()).close()  # the model cache let its network go: follow it
                forward = None
            if forward is None:
                forward = cls(plan.settings, plan.device, plan.resolution, plan.compile, plan.batch_size,
                              layer_shapes=dict(plan.layer_shapes), settings_resolved=True)
                forward._kept = True
                _SERVING[plan.key()] = forward
                for stale in list(_SERVING)[:-_KEPT]:
                    evicted = _SERVING.pop(stale)
                    if evicted._kept:
                        evicted.close()
        if plan.model_sha256 and forward.loaded.sha256 != plan.model_sha256:
            # The checkpoint was rewritten since the run started: its tasks would mix two networks' values.
            raise InputChangedError(
                f"{plan.settings.model.name}: the checkpoint changed since this run started (sha256 {plan.model_sha256[:12]}… → "
                f"{forward.loaded.sha256[:12]}…); re-run: an unfinished output is then refused as made with another network"
            )
        prepare_module(forward.loaded.module, forward.device, forward.compile)
        return forward

    def plan(self) -> ForwardPlan:
        """What a task needs to find (or build) this forward in its process."""
        shapes = tuple((name, tuple(shape)) for name, shape in self.layer_shapes.items())
        return ForwardPlan(self.settings, self.device_option, self.resolution, self.compile, shapes, self.batch_size, self.loaded.sha256)

    def run(self, x: torch.Tensor, one_hot: torch.Tensor | None, need_output: bool, sigma: torch.Tensor | None = None) -> tuple[dict[str, torch.Tensor], torch.Tensor | None]:
        """The network on one prepared input batch: ({layer: activation}, network output or None), on the device.

        Diffusion networks: σ is the settings' (DEFAULT_SIGMA when unset) for every sample unless given per sample,
        and the output is D(x). Feature networks take `x` (float 0..255 images) alone; their output is what their
        forward returns. Pooling happens inside the capture, on the device."""
        fwd, device, module = self.settings, self.device, self.loaded.module
        feature = is_feature_network(module)
        if sigma is None and not feature:
            sigma = torch.full((x.shape[0],), DEFAULT_SIGMA if fwd.sigma is None else fwd.sigma, device=device)
        precision = ieee_float32_convolutions(device) if resolve_compute_dtype(fwd.compute_dtype) == torch.float32 else contextlib.nullcontext()
        with torch.inference_mode(), autocast_context(device, fwd.compute_dtype), precision, model_lock(device):
            if self.capture is not None:
                return self.capture.run(x, sigma, one_hot, need_output)
            return {}, (module(x) if feature else module(x, sigma, one_hot))

    def probe(self, batch: int = 1) -> dict[str, tuple[int, ...]]:
        """Per-sample output shape of every requested layer, from one real forward on `batch` zero images."""
        x = torch.zeros(batch, 3, self.resolution, self.resolution, device=self.device)
        acts, _ = self.run(x, None, need_output=False)
        return {name: tuple(a.shape[1:]) for name, a in acts.items()}

    @property
    def layer_pooling(self) -> dict[str, str]:
        """The pooling each layer's values had: the settings', or "none" for a layer that is one vector per
        sample already (pool3, cls), where pooling changes nothing (seen when the layers run: one probe if none has)."""
        if self.capture is None:
            return {}
        if not self.capture.has_run:  # a forward rebuilt with its layer shapes given has not run its layers yet
            self.probe()
        vectors = self.capture.vector_layers
        return {name: "none" if name in vectors else self.settings.pool for name in self.settings.layers}

    @property
    def layer_shapes(self) -> dict[str, tuple[int, ...]]:
        """Per-sample output shape of every requested layer (probed once, on one image)."""
        if self._layer_shapes is None:
            self._layer_shapes = self.probe()
        return self._layer_shapes

    @property
    def batch_size(self) -> int:
        """The batch given, else 64 on CPU; on CUDA from free memory and a measured forward of a few samples
        (at most MAX_AUTO_FEATURE_BATCH for feature networks). Chosen once, when first asked."""
        if self._batch_size is None:
            self._batch_size = self._chosen_batch_size()
        return self._batch_size

    def _chosen_batch_size(self) -> int:
        if not self.device.startswith("cuda"):
            return auto_batch_size(0, self.device)
        prepare_module(self.loaded.module, self.device, self.compile)
        planned = self._measured_bytes_per_sample() + per_sample_bytes(self.layer_shapes, self.resolution, self.settings.storage_dtype)
        return auto_batch_size(planned, self.device, MAX_AUTO_FEATURE_BATCH if self.loaded.kind == FEATURE_KIND else MAX_AUTO_BATCH)

    def _measured_bytes_per_sample(self, probe: int = 8) -> int:
        """CUDA memory one sample takes through the forward (peak over a `probe`-sample batch, per sample)."""
        dev = torch.device(self.device)
        torch.cuda.synchronize(dev)
        before = torch.cuda.memory_allocated(dev)
        torch.cuda.reset_peak_memory_stats(dev)
        x = torch.zeros(probe, 3, self.resolution, self.resolution, device=self.device)
        label_dim = self.loaded.label_dim
        one_hot = torch.zeros(probe, label_dim, device=self.device) if label_dim else None
        self.run(x, one_hot, need_output=self.settings.reconstructions or not self.settings.layers)
        torch.cuda.synchronize(dev)
        return max(1, (torch.cuda.max_memory_allocated(dev) - before) // probe)

    def close(self) -> None:
        """Remove the hooks from the (shared) module."""
        if self.capture is not None:
            self.capture.close()

    def __enter__(self) -> PreparedForward:
        """Serve this run's tasks in this process from this object until the block ends."""
        with _SERVING_GUARD:
            _SERVING[self.plan_key()] = self
        return self

    def __exit__(self, *_exc: object) -> None:
        with _SERVING_GUARD:
            if _SERVING.get(self.plan_key()) is self:
                del _SERVING[self.plan_key()]
        self.close()

    def plan_key(self) -> tuple:
        return (self.settings, self.device_option, self.resolution, self.compile)


# This process's PreparedForwards by plan key: the running driver's own (its tasks here share its hooks), and those
# built for tasks sent from elsewhere, of which the last _KEPT stay (one per run, as the model cache keeps models).
_SERVING: dict[tuple, PreparedForward] = {}
_SERVING_GUARD = threading.Lock()
_KEPT = 4
