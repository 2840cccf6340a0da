"""A task's samples through a PreparedForward into shard-sized host buffers, batch by batch.

Per batch, on the compute device: the input (for diffusion networks x = uint8/127.5 − 1 and/or σ·`extractor.noise`
noise; feature networks get the clean image as float 0..255 and preprocess it themselves), the prepared forward
(`extractor.forward`: hooks registered once, the per-device lock around the forward only), the cast to the storage
dtype and a per-sample NaN/Inf flag. The results then land in shard-sized host buffers: on CPU the cast writes
straight into them; on CUDA they are pinned and filled by non-blocking copies on a copy stream, so the copy of one
batch overlaps the next batch's compute. Whoever consumes the buffers (the shard writer) is told, per batch, when
its rows are final.
"""

from __future__ import annotations

import threading
from collections.abc import Callable
from typing import Any

import numpy as np
import torch

from extractor import cast_cpu, noise_cpu
from extractor.forward import ExtractionError, PreparedForward
from extractor.noise import NoiseGenerator
from schemas.activation_store import FEATURE_KIND

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
    On CPU this beats a float max and min on float16 (one integer pass); other dtypes use max and min,
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



ReadyCallback = Callable[[int, int, Callable[[], None] | None], None]


class ReusePool:
    """Objects (shard buffers, noise generators, input scratch) handed from task to task within a process.

    Fresh memory is slow to touch (page faults) and pinned memory slow to allocate: a shard buffer made per task
    would cap the write path at the page-fault rate. Keys say what fits.
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
    """One task's samples through the prepared forward into shard-sized host buffers, batch by batch.

    `buffers[name]` ([count, *shape], storage dtype; uint8 for `output_name`, the network's D(x) as images) are
    filled in place; after each batch `on_ready(first, stop, wait)` says rows [first, stop) are final once `wait()`
    returns (None: already). `nonfinite()` gives the NaN/Inf rows per layer and of D(x) (checked before its uint8
    conversion, which would turn NaN into black pixels), as positions offset by `start`. `noise_seed`: the seed
    of the noise stream, where it is not the settings' own (generation's, extractor.noise.generation_noise_seed).
    """

    def __init__(
        self, forward: PreparedForward, count: int, output_name: str | None, on_ready: ReadyCallback | None = None, noise_seed: int | None = None
    ):
        fwd, device = forward.settings, forward.device
        self.forward, self.fwd, self.device, self.count = forward, fwd, device, count
        self.output_name = output_name
        self.on_ready = on_ready
        self.device_type = torch.device(device).type
        self.cuda = self.device_type == "cuda"
        self.feature = forward.loaded.kind == FEATURE_KIND
        self.storage = getattr(torch, fwd.storage_dtype)
        self.image_shape = (3, forward.resolution, forward.resolution)
        layer_shapes = forward.layer_shapes
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
        seed = fwd.noise_seed if noise_seed is None or fwd.noise_seed is None else noise_seed
        self._noise_key = ("noise", seed, self.image_shape, device)
        self.noise = None if seed is None else REUSE.take(self._noise_key, lambda: NoiseGenerator(seed, self.image_shape, device))
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
        one_hot = None if self.feature else one_hot_labels(labels, self.forward.loaded.label_dim, self.device, self.fwd.class_free)
        acts, out = self.forward.run(x, one_hot, need_output=self.output_name is not None)
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

