"""EDM's `EDMPrecond` around the ADM U-Net (`DhariwalUNet`), state-dict compatible with NVlabs/edm.

Module paths, parameter names, shapes and the order of operations follow EDM's `training/networks.py`, so
checkpoints of EDM and DMD2 load strictly and produce the same numbers (checked against
`tests/fixtures/edm_small_A.pt`, made with the reference code: README "Models").

Precision: the network always holds float32 weights and `EDMPrecond.forward` always returns float32. Lower
precision is opted into by the caller with `autocast_context(device, "bf16" | "fp16")`. The original's
`use_fp16` flag is accepted and kept as an attribute (so configs and pickled `_init_kwargs` load unchanged), but
it does NOT switch precision here: precision is the caller's explicit choice, never implied by a checkpoint.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Iterator, Mapping, Sequence
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extractor.models import seeded
from schemas.errors import ImzarrError

__all__ = [
    "CONFIG_KEYS",
    "Conv2d",
    "DhariwalUNet",
    "EDMPrecond",
    "GroupNorm",
    "InvalidClassLabelsError",
    "InvalidSigmaError",
    "Linear",
    "PRESETS",
    "PositionalEmbedding",
    "SMALLEST_TRAINING_SIGMA",
    "TORCH_COMPUTE_DTYPES",
    "UNetBlock",
    "UnsupportedConfigError",
    "autocast_context",
    "pixel_attention",
    "resolve_compute_dtype",
]

# DMD2's smallest training noise level; suggested when a caller asks for sigma <= 0.
SMALLEST_TRAINING_SIGMA = 0.002

PRESETS: dict[str, dict[str, Any]] = {
    # DMD2's ImageNet-64 one-step generator (= EDM's ImageNet ADM network without dropout).
    "dmd2-imagenet64": dict(
        img_resolution=64,
        img_channels=3,
        label_dim=1000,
        use_fp16=False,
        sigma_min=0.0,
        sigma_max=float("inf"),
        sigma_data=0.5,
        model_type="DhariwalUNet",
        model_channels=192,
        channel_mult=[1, 2, 3, 4],
        channel_mult_emb=4,
        num_blocks=3,
        attn_resolutions=[32, 16, 8],
        dropout=0.0,
        label_dropout=0.0,
        augment_dim=0,
    ),
}
# Small random network with the same interface, for demos and tests (never trained).
PRESETS["tiny-random"] = {
    **PRESETS["dmd2-imagenet64"],
    "model_channels": 32,
    "channel_mult": [1, 2, 2],
    "num_blocks": 1,
    "attn_resolutions": [16],
}


class InvalidSigmaError(ImzarrError, ValueError):
    """A noise level the network cannot take (sigma <= 0 or not finite: ln(sigma) would be -inf/NaN)."""


class InvalidClassLabelsError(ImzarrError, ValueError):
    """Class labels of the wrong shape, dtype or range."""


class UnsupportedConfigError(ImzarrError, ValueError):
    """A constructor argument this implementation does not support."""


# ---------------------------------------------------------------------------------------------------------------
# Initialisation (EDM's `weight_init`): from torch's global RNG at construction, as in EDM, or, for presets, from
# the seeded rule of extractor/models/seeded.py, so preset weights are the same bits on every machine and build.


def _draw_(target: Tensor, mode: str, fan_in: int, gain: float, seeded_as: tuple[int, int] | None) -> None:
    """EDM's weight_init times `gain`, written into a float32 CPU tensor in place.

    kaiming_uniform: (2u − 1)·√(3 / fan_in), kaiming_normal: z·√(1 / fan_in), then × gain; u ~ U[0, 1), z ~ N(0, 1)
    from torch's global RNG when `seeded_as` is None, else `seeded.draw(seed, index, ...)` for (seed, index) =
    `seeded_as`. Every step after the draw is a correctly rounded float32 op (the same bits on every build).
    """
    distribution = {"kaiming_uniform": "uniform", "kaiming_normal": "normal"}.get(mode)
    if distribution is None:
        raise UnsupportedConfigError(f"unsupported init mode {mode!r}")
    if seeded_as is not None:
        target.copy_(seeded.draw(*seeded_as, target.shape, distribution))
    elif distribution == "uniform":
        target.uniform_(0, 1)
    else:
        target.normal_(0, 1)
    if distribution == "uniform":
        target.mul_(2).sub_(1).mul_(math.sqrt(3 / fan_in))
    else:
        target.mul_(math.sqrt(1 / fan_in))
    target.mul_(gain)


class _Initialisable(nn.Module):
    """A layer that knows EDM's init for its weight and bias."""

    weight: nn.Parameter | None
    bias: nn.Parameter | None
    init_mode: str
    init_weight: float
    init_bias: float
    fan_in: int

    def reset_parameters(self, zero_init_scale: float = 0.0, seeded_as: Mapping[str, tuple[int, int]] | None = None) -> None:
        """Re-draw weight and bias; layers EDM zero-initialises get `zero_init_scale` times a kaiming draw.

        `seeded_as` maps "weight" / "bias" to (seed, state-dict index) for the seeded rule (`_draw_`); without
        it draws come from torch's global CPU RNG, as at construction. Every tensor is drawn, even for zero
        gains, as in the original, so the global RNG sequence matches EDM's construction-time init.
        """
        for name, param, gain in (("weight", self.weight, self.init_weight), ("bias", self.bias, self.init_bias)):
            if param is None or param.device.type == "meta":
                continue
            scale = gain if gain != 0 else zero_init_scale
            source = None if seeded_as is None else seeded_as[name]
            with torch.no_grad():
                if param.device.type == "cpu" and param.dtype == torch.float32:
                    _draw_(param.data, self.init_mode, self.fan_in, scale, source)
                else:
                    value = torch.empty(param.shape)
                    _draw_(value, self.init_mode, self.fan_in, scale, source)
                    param.copy_(value)


def _box_filter() -> Tensor:
    """[1,1] (x) [1,1] / 4 as a [1, 1, 2, 2] filter: 2x2 box resampling."""
    # One fill, not torch.outer: on the meta device outer's kernel imports torch._dynamo (~2 s per process).
    return torch.full((1, 1, 2, 2), 0.25)


class Linear(_Initialisable):
    """Fully connected layer with EDM's parameter layout (weight [out, in], optional bias)."""

    def __init__(
        self,
        in_features: int,
        out_features: int,
        bias: bool = True,
        init_mode: str = "kaiming_normal",
        init_weight: float = 1.0,
        init_bias: float = 0.0,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.init_mode, self.init_weight, self.init_bias = init_mode, init_weight, init_bias
        self.fan_in = in_features
        self.weight = nn.Parameter(torch.empty(out_features, in_features))
        self.bias = nn.Parameter(torch.empty(out_features)) if bias else None
        self.reset_parameters()

    def forward(self, x: Tensor) -> Tensor:
        return F.linear(x, self.weight, self.bias)


class Conv2d(_Initialisable):
    """EDM's convolution with optional 2x up/down resampling by `resample_filter`; kernel 0 = resample only."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        kernel: int,  # 0: resample only
        bias: bool = True,
        up: bool = False,
        down: bool = False,
        # EDM's weight initialisation (replaced by a checkpoint's or a preset's seeded weights)
        init_mode: str = "kaiming_normal", init_weight: float = 1.0, init_bias: float = 0.0,
    ) -> None:
        if up and down:
            raise UnsupportedConfigError("Conv2d cannot both upsample and downsample")
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.up = up
        self.down = down
        self.init_mode, self.init_weight, self.init_bias = init_mode, init_weight, init_bias
        self.fan_in = in_channels * kernel * kernel
        self.weight = nn.Parameter(torch.empty(out_channels, in_channels, kernel, kernel)) if kernel else None
        self.bias = nn.Parameter(torch.empty(out_channels)) if kernel and bias else None
        # Persistent so that state dicts carry it, as in the original.
        self.register_buffer("resample_filter", _box_filter() if (up or down) else None)
        self.reset_parameters()

    def reset_parameters(self, zero_init_scale: float = 0.0, seeded_as: Mapping[str, tuple[int, int]] | None = None) -> None:
        super().reset_parameters(zero_init_scale, seeded_as)
        if self.resample_filter is not None and self.resample_filter.device.type != "meta":
            with torch.no_grad():
                self.resample_filter.copy_(_box_filter())

    def forward(self, x: Tensor) -> Tensor:
        if self.up or self.down:
            f = self.resample_filter.to(x.dtype)
            depthwise = f.tile([self.in_channels, 1, 1, 1])
            pad = (f.shape[-1] - 1) // 2
            if self.up:
                # The transposed conv spreads each pixel over 2x2 outputs; 4x keeps the mean unchanged.
                x = F.conv_transpose2d(x, depthwise * 4, groups=self.in_channels, stride=2, padding=pad)
            else:
                x = F.conv2d(x, depthwise, groups=self.in_channels, stride=2, padding=pad)
        if self.weight is not None:
            x = F.conv2d(x, self.weight, self.bias, padding=self.weight.shape[-1] // 2)
        return x


class GroupNorm(nn.Module):
    """Group normalisation with min(32, C // 4) groups."""

    def __init__(self, num_channels: int, num_groups: int = 32, min_channels_per_group: int = 4, eps: float = 1e-5):
        super().__init__()
        self.num_groups = min(num_groups, num_channels // min_channels_per_group)
        if self.num_groups < 1:
            raise UnsupportedConfigError(
                f"GroupNorm needs at least {min_channels_per_group} channels, got {num_channels}"
            )
        self.eps = eps
        self.weight = nn.Parameter(torch.ones(num_channels))
        self.bias = nn.Parameter(torch.zeros(num_channels))

    def reset_parameters(self) -> None:
        if self.weight.device.type == "meta":
            return
        with torch.no_grad():
            self.weight.fill_(1.0)
            self.bias.zero_()

    def forward(self, x: Tensor) -> Tensor:
        return F.group_norm(x, self.num_groups, self.weight, self.bias, self.eps)


@contextlib.contextmanager
def _autocast_disabled(device_type: str) -> Iterator[None]:
    """Leave any surrounding autocast so the attention logits are computed in float32."""
    if device_type in ("cuda", "cpu") and torch.is_autocast_enabled(device_type):
        with torch.autocast(device_type=device_type, enabled=False):
            yield
    else:
        yield


def pixel_attention(qkv: Tensor, num_heads: int) -> Tensor:
    """Multi-head self-attention over pixels from EDM's interleaved qkv map [N, 3C, H, W] -> [N, C, H, W].

    Channel layout of `qkv`: (head, channel-in-head, q|k|v), i.e. q, k, v are interleaved per channel (not ADM's
    [q|k|v] blocks). Softmax over keys of q.k / sqrt(C / heads) (SDPA's default scale). A float32 `qkv` gets
    exact float32 attention even inside autocast; a half-precision one (under autocast) goes to the fused
    kernels, which keep logits and softmax in float32 as the original's AttentionOp does.
    """
    n, c3, h, w = qkv.shape
    c = c3 // 3
    ch = c // num_heads
    # [N, heads, ch, 3, HW] -> q, k, v as [N, heads, HW, ch], contiguous as the fused kernels want.
    q, k, v = (t.transpose(-1, -2).contiguous() for t in qkv.reshape(n, num_heads, ch, 3, h * w).unbind(3))
    if qkv.dtype == torch.float32:
        with _autocast_disabled(qkv.device.type):
            a = F.scaled_dot_product_attention(q, k, v)
    else:
        a = F.scaled_dot_product_attention(q, k, v)
    # [N, heads, HW, ch] -> [N, heads, ch, HW] -> [N, C, H, W]: channel index = head * ch + c, as the original.
    return a.transpose(-1, -2).reshape(n, c, h, w)


class UNetBlock(nn.Module):
    """ADM residual block: norm-silu-conv, adaptive scale/shift from the embedding, optional up/down and attention."""

    def __init__(
        self,
        in_channels: int,
        out_channels: int,
        emb_channels: int,
        up: bool = False,
        down: bool = False,
        attention: bool = False,
        channels_per_head: int = 64,
        dropout: float = 0.0,
        skip_scale: float = 1.0,
        eps: float = 1e-5,
    ) -> None:
        super().__init__()
        self.in_channels = in_channels
        self.out_channels = out_channels
        self.emb_channels = emb_channels
        # Narrower than one head: the original silently builds no attention at all.
        self.num_heads = out_channels // channels_per_head if attention else 0
        self.dropout = dropout
        self.skip_scale = skip_scale
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)

        self.norm0 = GroupNorm(in_channels, eps=eps)
        self.conv0 = Conv2d(in_channels, out_channels, kernel=3, up=up, down=down, **init)
        self.affine = Linear(emb_channels, out_channels * 2, **init)
        self.norm1 = GroupNorm(out_channels, eps=eps)
        self.conv1 = Conv2d(out_channels, out_channels, kernel=3, **init_zero)

        self.skip: Conv2d | None = None
        if out_channels != in_channels or up or down:
            # A 1x1 projection only when widths differ; otherwise the skip path is a pure resample.
            kernel = 1 if out_channels != in_channels else 0
            self.skip = Conv2d(in_channels, out_channels, kernel=kernel, up=up, down=down, **init)

        if self.num_heads:
            self.norm2 = GroupNorm(out_channels, eps=eps)
            self.qkv = Conv2d(out_channels, out_channels * 3, kernel=1, **init)
            self.proj = Conv2d(out_channels, out_channels, kernel=1, **init_zero)

    def forward(self, x: Tensor, emb: Tensor) -> Tensor:
        orig = x
        x = self.conv0(F.silu(self.norm0(x)))

        params = self.affine(emb).unsqueeze(2).unsqueeze(3).to(x.dtype)
        scale, shift = params.chunk(chunks=2, dim=1)
        x = F.silu(torch.addcmul(shift, self.norm1(x), scale + 1))

        x = self.conv1(F.dropout(x, p=self.dropout, training=self.training))
        x = x + (self.skip(orig) if self.skip is not None else orig)
        x = x * self.skip_scale

        if self.num_heads:
            a = pixel_attention(self.qkv(self.norm2(x)), self.num_heads)
            x = self.proj(a) + x
            x = x * self.skip_scale
        return x


class PositionalEmbedding(nn.Module):
    """Sinusoidal embedding of a scalar per sample: [cos(x f_i) | sin(x f_i)], f_i = (1/max_positions)^(i/(C/2))."""

    def __init__(self, num_channels: int, max_positions: int = 10000, endpoint: bool = False) -> None:
        super().__init__()
        self.num_channels = num_channels
        self.max_positions = max_positions
        self.endpoint = endpoint

    def forward(self, x: Tensor) -> Tensor:
        half = self.num_channels // 2
        freqs = torch.arange(start=0, end=half, dtype=torch.float32, device=x.device)
        freqs = freqs / (half - (1 if self.endpoint else 0))
        freqs = (1 / self.max_positions) ** freqs
        x = torch.outer(x, freqs.to(x.dtype))
        return torch.cat([x.cos(), x.sin()], dim=1)


class DhariwalUNet(nn.Module):
    """The ADM U-Net ("Diffusion Models Beat GANs") as re-implemented in EDM; module names match EDM's."""

    def __init__(
        self,
        img_resolution: int,
        in_channels: int,
        out_channels: int,
        label_dim: int = 0,
        augment_dim: int = 0,
        model_channels: int = 192,
        channel_mult: Sequence[int] = (1, 2, 3, 4),
        channel_mult_emb: int = 4,
        num_blocks: int = 3,
        attn_resolutions: Sequence[int] = (32, 16, 8),
        dropout: float = 0.10,
        label_dropout: float = 0.0,
    ) -> None:
        super().__init__()
        if img_resolution % (1 << (len(channel_mult) - 1)):
            raise UnsupportedConfigError(
                f"img_resolution {img_resolution} is not divisible by 2**{len(channel_mult) - 1} "
                f"(channel_mult {list(channel_mult)})"
            )
        self.label_dropout = label_dropout
        emb_channels = model_channels * channel_mult_emb
        init = dict(init_mode="kaiming_uniform", init_weight=math.sqrt(1 / 3), init_bias=math.sqrt(1 / 3))
        init_zero = dict(init_mode="kaiming_uniform", init_weight=0.0, init_bias=0.0)
        block_kwargs = dict(emb_channels=emb_channels, channels_per_head=64, dropout=dropout)

        # Mapping network: noise level (and labels) -> one embedding shared by all blocks.
        self.map_noise = PositionalEmbedding(num_channels=model_channels)
        self.map_augment = (
            Linear(augment_dim, model_channels, bias=False, **init_zero) if augment_dim else None
        )
        self.map_layer0 = Linear(model_channels, emb_channels, **init)
        self.map_layer1 = Linear(emb_channels, emb_channels, **init)
        self.map_label = (
            Linear(label_dim, emb_channels, bias=False, init_mode="kaiming_normal", init_weight=math.sqrt(label_dim))
            if label_dim
            else None
        )

        self.enc = nn.ModuleDict()
        cout = in_channels
        for level, mult in enumerate(channel_mult):
            res = img_resolution >> level
            if level == 0:
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_conv"] = Conv2d(cin, cout, kernel=3, **init)
            else:
                self.enc[f"{res}x{res}_down"] = UNetBlock(cout, cout, down=True, **block_kwargs)
            for idx in range(num_blocks):
                cin, cout = cout, model_channels * mult
                self.enc[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        skips = [block.out_channels for block in self.enc.values()]

        self.dec = nn.ModuleDict()
        for level, mult in reversed(list(enumerate(channel_mult))):
            res = img_resolution >> level
            if level == len(channel_mult) - 1:
                self.dec[f"{res}x{res}_in0"] = UNetBlock(cout, cout, attention=True, **block_kwargs)
                self.dec[f"{res}x{res}_in1"] = UNetBlock(cout, cout, **block_kwargs)
            else:
                self.dec[f"{res}x{res}_up"] = UNetBlock(cout, cout, up=True, **block_kwargs)
            for idx in range(num_blocks + 1):
                cin, cout = cout + skips.pop(), model_channels * mult
                self.dec[f"{res}x{res}_block{idx}"] = UNetBlock(
                    cin, cout, attention=(res in attn_resolutions), **block_kwargs
                )
        self.out_norm = GroupNorm(cout)
        self.out_conv = Conv2d(cout, out_channels, kernel=3, **init_zero)

    def embedding(
        self, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None = None
    ) -> Tensor:
        """The shared block embedding (after the final silu)."""
        emb = self.map_noise(noise_labels)
        if self.map_augment is not None and augment_labels is not None:
            emb = emb + self.map_augment(augment_labels)
        emb = F.silu(self.map_layer0(emb))
        emb = self.map_layer1(emb)
        if self.map_label is not None and class_labels is not None:
            labels = class_labels
            if self.training and self.label_dropout:
                keep = torch.rand([labels.shape[0], 1], device=labels.device) >= self.label_dropout
                labels = labels * keep.to(labels.dtype)
            emb = emb + self.map_label(labels)
        return F.silu(emb)

    def forward(
        self, x: Tensor, noise_labels: Tensor, class_labels: Tensor | None, augment_labels: Tensor | None = None
    ) -> Tensor:
        emb = self.embedding(noise_labels, class_labels, augment_labels)

        skips = []
        for block in self.enc.values():
            x = block(x, emb) if isinstance(block, UNetBlock) else block(x)
            skips.append(x)

        for block in self.dec.values():
            # Blocks right after a level change take the matching encoder output concatenated on channels.
            if x.shape[1] != block.in_channels:
                x = torch.cat([x, skips.pop()], dim=1)
            x = block(x, emb)
        return self.out_conv(F.silu(self.out_norm(x)))


# What DhariwalUNet takes from its caller rather than from the model config (EDMPrecond passes these itself).
_PRECOND_PROVIDES = ("img_resolution", "in_channels", "out_channels", "label_dim")


def _keyword_defaults(fn: Any, skip: Sequence[str] = ()) -> dict[str, Any]:
    """{name: default} of a function's named parameters (no default: inspect.Parameter.empty)."""
    params = inspect.signature(fn).parameters.values()
    return {p.name: p.default for p in params if p.name != "self" and p.name not in skip and p.kind is not p.VAR_KEYWORD}


class EDMPrecond(nn.Module):
    """EDM preconditioning D(x; sigma, labels) = c_skip x + c_out F(c_in x; ln(sigma)/4, labels), F a DhariwalUNet.

    As in EDM, the U-Net's own keyword arguments pass through `**model_kwargs`; `config` holds every argument
    with its value (defaults filled in), under the original names, so it rebuilds the same network.
    """

    def __init__(
        self,
        img_resolution: int,
        img_channels: int,
        label_dim: int = 0,
        use_fp16: bool = False,
        sigma_min: float = 0.0,
        sigma_max: float = float("inf"),
        sigma_data: float = 0.5,
        model_type: str = "DhariwalUNet",
        **model_kwargs: Any,
    ) -> None:
        super().__init__()
        if model_type != "DhariwalUNet":
            raise UnsupportedConfigError(f"model_type {model_type!r} is not supported (only 'DhariwalUNet')")
        unet_defaults = _keyword_defaults(DhariwalUNet.__init__, skip=_PRECOND_PROVIDES)
        unknown = sorted(set(model_kwargs) - set(unet_defaults))
        if unknown:
            raise UnsupportedConfigError(f"DhariwalUNet takes no argument(s) {unknown}")
        self.img_resolution = int(img_resolution)
        self.img_channels = int(img_channels)
        self.label_dim = int(label_dim)
        self.use_fp16 = bool(use_fp16)  # accepted for compatibility; see the module docstring
        self.sigma_min = float(sigma_min)
        self.sigma_max = float(sigma_max)
        self.sigma_data = float(sigma_data)
        unet_kwargs = {**unet_defaults, **model_kwargs}
        self.config: dict[str, Any] = dict(
            img_resolution=self.img_resolution,
            img_channels=self.img_channels,
            label_dim=self.label_dim,
            use_fp16=self.use_fp16,
            sigma_min=self.sigma_min,
            sigma_max=self.sigma_max,
            sigma_data=self.sigma_data,
            model_type=model_type,
            **{k: list(v) if isinstance(v, (tuple, list)) else v for k, v in unet_kwargs.items()},
        )
        self.model = DhariwalUNet(
            img_resolution=self.img_resolution,
            in_channels=self.img_channels,
            out_channels=self.img_channels,
            label_dim=self.label_dim,
            **unet_kwargs,
        )

    def reset_parameters(self, zero_init_scale: float = 0.0, seed: int | None = None) -> None:
        """Redo EDM's initialisation: from torch's global RNG when `seed` is None (as at construction), else by the
        seeded rule of extractor/models/seeded.py (state-dict tensor i from the stream of (seed, i)); skips meta.

        `zero_init_scale` > 0 replaces the zeros EDM puts in conv1/proj/out_conv/map_augment by a scaled kaiming
        draw, so an untrained network still has non-trivial residual branches.
        """
        position = {key: i for i, key in enumerate(self.state_dict(keep_vars=True))}
        for path, module in self.named_modules():
            if isinstance(module, _Initialisable):
                seeded_as = None
                if seed is not None:
                    seeded_as = {name: (seed, position[f"{path}.{name}"]) for name in ("weight", "bias")
                                 if getattr(module, name) is not None}
                module.reset_parameters(zero_init_scale, seeded_as)
            elif isinstance(module, GroupNorm):
                module.reset_parameters()

    def condition(
        self, x: Tensor, sigma: Tensor | float, class_labels: Tensor | None
    ) -> tuple[Tensor, Tensor, Tensor | None]:
        """Validate and normalise inputs: x float32, sigma [N,1,1,1] float32 > 0, labels [N, label_dim] or None."""
        x = x.to(torch.float32)
        if x.ndim != 4 or x.shape[1] != self.img_channels:
            raise ValueError(f"x must be [N, {self.img_channels}, H, W], got {tuple(x.shape)}")
        n = x.shape[0]
        sigma = torch.as_tensor(sigma, dtype=torch.float32, device=x.device).reshape(-1)
        if sigma.numel() == 1 and n != 1:
            sigma = sigma.expand(n)
        if sigma.numel() != n:
            raise InvalidSigmaError(f"sigma must be a scalar or have one value per sample ({n}), got {sigma.numel()}")
        if sigma.device.type != "meta" and not bool(torch.isfinite(sigma).all() and (sigma > 0).all()):
            bad = sigma[~(torch.isfinite(sigma) & (sigma > 0))]
            raise InvalidSigmaError(
                f"sigma must be finite and > 0 (ln(sigma) is the noise input), got {bad.tolist()[:4]}; "
                f"use a small positive value such as {SMALLEST_TRAINING_SIGMA} (DMD2's smallest training sigma)"
            )
        return x, sigma.reshape(-1, 1, 1, 1), self._labels(class_labels, n, x.device)

    def _labels(self, class_labels: Tensor | None, n: int, device: torch.device) -> Tensor | None:
        if self.label_dim == 0:
            return None
        if class_labels is None:
            return torch.zeros([1, self.label_dim], device=device)
        labels = class_labels.to(device)
        if not labels.is_floating_point():
            if labels.ndim != 1 or labels.shape[0] != n:
                raise InvalidClassLabelsError(
                    f"integer class ids must have shape [{n}], got {tuple(labels.shape)}"
                )
            if labels.device.type != "meta" and n and bool(((labels < 0) | (labels >= self.label_dim)).any()):
                raise InvalidClassLabelsError(
                    f"class ids must be in [0, {self.label_dim}), got min {int(labels.min())} max {int(labels.max())}"
                )
            return F.one_hot(labels.long(), self.label_dim).to(torch.float32)
        labels = labels.to(torch.float32)
        if labels.ndim != 2 or labels.shape[1] != self.label_dim or labels.shape[0] not in (1, n):
            raise InvalidClassLabelsError(
                f"float class labels must have shape [{n}, {self.label_dim}], got {tuple(labels.shape)}"
            )
        return labels

    def forward(
        self,
        x: Tensor,
        sigma: Tensor | float,
        class_labels: Tensor | None = None,
        augment_labels: Tensor | None = None,
    ) -> Tensor:
        x, sigma, labels = self.condition(x, sigma, class_labels)
        sd2 = self.sigma_data**2
        c_skip = sd2 / (sigma**2 + sd2)
        c_out = sigma * self.sigma_data / (sigma**2 + sd2).sqrt()
        c_in = 1 / (sd2 + sigma**2).sqrt()
        c_noise = sigma.log() / 4

        f_x = self.model(c_in * x, c_noise.flatten(), class_labels=labels, augment_labels=augment_labels)
        return c_skip * x + c_out * f_x.to(torch.float32)


# The keyword arguments EDMPrecond takes (the original's names), i.e. the keys of `EDMPrecond.config`.
CONFIG_KEYS: tuple[str, ...] = (
    *_keyword_defaults(EDMPrecond.__init__),
    *_keyword_defaults(DhariwalUNet.__init__, skip=_PRECOND_PROVIDES),
)


# ---------------------------------------------------------------------------------------------------------------
# Precision.

# The torch dtype of each precision name the commands offer (schemas.vocabulary.COMPUTE_DTYPE_NAMES, less auto).
TORCH_COMPUTE_DTYPES: dict[str, torch.dtype] = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def resolve_compute_dtype(compute_dtype: str | torch.dtype) -> torch.dtype:
    """Map "fp32"/"bf16"/"fp16" (or a torch dtype) to the torch dtype, rejecting anything else."""
    if isinstance(compute_dtype, torch.dtype):
        if compute_dtype not in TORCH_COMPUTE_DTYPES.values():
            raise ValueError(f"unsupported compute dtype {compute_dtype}")
        return compute_dtype
    try:
        return TORCH_COMPUTE_DTYPES[compute_dtype.lower()]
    except (KeyError, AttributeError):
        raise ValueError(
            f"unsupported compute dtype {compute_dtype!r}; choose one of {', '.join(TORCH_COMPUTE_DTYPES)}"
        ) from None


def autocast_context(
    device: torch.device | str, compute_dtype: str | torch.dtype = "fp32"
) -> contextlib.AbstractContextManager[Any]:
    """Context for running the network at `compute_dtype`: nothing for fp32, torch.autocast otherwise.

    Weights stay float32; GroupNorm and the attention logits/softmax stay float32 under autocast; the output of
    `EDMPrecond.forward` is always float32. Half precision is meant for CUDA; on CPU only bf16 is allowed.
    """
    dtype = resolve_compute_dtype(compute_dtype)
    device_type = torch.device(device).type
    if dtype == torch.float32:
        return contextlib.nullcontext()
    if device_type == "cuda":
        return torch.autocast(device_type="cuda", dtype=dtype)
    if device_type == "cpu" and dtype == torch.bfloat16:
        return torch.autocast(device_type="cpu", dtype=dtype)
    raise ValueError(f"compute dtype {compute_dtype!r} is not supported on device {device!s}")
