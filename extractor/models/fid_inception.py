"""The FID Inception-v3: the TensorFlow 2015-12-05 Inception graph as pytorch-fid runs it, state-dict compatible.

Architecture: torchvision's Inception-v3 module tree and parameter names (`Conv2d_1a_3x3.conv.weight`,
`Mixed_7c.branch_pool.bn.running_var`, ...), without the auxiliary classifier, 1008 logits, and the four block
variants TensorFlow's graph differs by: in Mixed_5b-5d (A), Mixed_6b-6e (C) and Mixed_7b (E) the pooling branch
averages over the 3×3 window without counting zero padding (`count_include_pad=False`); in Mixed_7c it takes the
3×3 maximum instead. BatchNorm eps is 0.001. Weights: `pt_inception-2015-12-05-6726825d.pth`, a plain state dict.

Input protocol (pytorch-fid's `InceptionV3(resize_input=True, normalize_input=True)`): uint8 RGB x → x / 255 →
bilinear resize to 299×299 (`align_corners=False`, no antialiasing) → 2x − 1. `forward` does all of it.

Layers: `Conv2d_1a_3x3` … `Conv2d_4a_3x3`, `maxpool1`, `maxpool2`, `Mixed_5b` … `Mixed_7c`, `pool3` (2048-d global
average of Mixed_7c, the FID feature) and `logits` (1008-d, `fc(pool3)`), each its module's output; and
pytorch-fid's four feature depths by name, `fid64`, `fid192`, `fid768`, `fid2048`: the features `pytorch-fid
--dims D` computes, i.e. `InceptionV3(output_blocks=[BLOCK_INDEX_BY_DIM[D]])` (its blocks end after maxpool1
(64 ch, block 0), maxpool2 (192 ch, block 1), Mixed_6e (768 ch, block 2) and the final 1×1 average pool (2048 ch,
block 3)) followed by fid_score's `adaptive_avg_pool2d(pred, (1, 1))` where the map is larger than 1×1, squeezed
to [N, D]. So `fidD` = the spatial mean of that block's output map (`fid2048` equals `pool3`); tested against
pytorch-fid 0.3.0's own code in tests/extractor/test_feature_models.py.
"""

from __future__ import annotations

import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from extractor.models import seeded
from extractor.models.capture import images_as_float
from extractor.models.checkpoints import CheckpointError, CheckpointMismatchError

__all__ = [
    "FAMILY",
    "FID_INCEPTION_CLASSES",
    "FIDInceptionV3",
    "INPUT_SIZE",
    "NotFIDInceptionError",
    "PREPROCESSING",
    "PRESETS",
    "PRESET_SEED",
    "PYTORCH_FID_DIMS",
    "build",
    "canonical_state_dict",
    "claims_state_dict",
    "config_from_state_dict",
    "random_state_dict",
]

FAMILY = "fid-inception"
INPUT_SIZE = 299
FID_INCEPTION_CLASSES = 1008  # TensorFlow's 2015 graph: 1000 classes plus 8 unused outputs
PRESETS: dict[str, dict[str, Any]] = {"fid-inception": {"num_classes": FID_INCEPTION_CLASSES}}
PRESET_SEED = 0
PREPROCESSING = (
    "pytorch-fid: uint8 RGB x -> x/255 -> bilinear resize to 299x299 (align_corners=False, no antialias) -> 2x-1"
)
BN_EPS = 0.001
# The signature of the file's key set: stem, the FID-specific last block, the 1008-way classifier.
# An Inception-v3 by its stem: a file missing later keys is still claimed, so that loading names what it lacks.
_SIGNATURE_KEYS = ("Conv2d_1a_3x3.conv.weight", "Conv2d_2a_3x3.conv.weight")


class NotFIDInceptionError(CheckpointError):
    """An Inception-v3 state dict that is not the FID network (e.g. torchvision's ImageNet weights)."""


class BasicConv2d(nn.Module):
    """Convolution without bias, BatchNorm (eps 0.001), ReLU."""

    def __init__(self, in_channels: int, out_channels: int, kernel_size: int | tuple[int, int], **conv: Any) -> None:
        super().__init__()
        self.conv = nn.Conv2d(in_channels, out_channels, kernel_size, bias=False, **conv)
        self.bn = nn.BatchNorm2d(out_channels, eps=BN_EPS)

    def forward(self, x: Tensor) -> Tensor:
        return F.relu(self.bn(self.conv(x)))


def _tf_avg_pool(x: Tensor) -> Tensor:
    """TensorFlow's 3×3/1 'SAME' average pool: padded positions are not counted in the mean."""
    return F.avg_pool2d(x, kernel_size=3, stride=1, padding=1, count_include_pad=False)


class MixedA(nn.Module):
    """35×35 block: 1×1, 5×5, double 3×3 and pooled 1×1 branches (Mixed_5b-5d)."""

    def __init__(self, in_channels: int, pool_features: int) -> None:
        super().__init__()
        self.branch1x1 = BasicConv2d(in_channels, 64, 1)
        self.branch5x5_1 = BasicConv2d(in_channels, 48, 1)
        self.branch5x5_2 = BasicConv2d(48, 64, 5, padding=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, padding=1)
        self.branch_pool = BasicConv2d(in_channels, pool_features, 1)

    def forward(self, x: Tensor) -> Tensor:
        five = self.branch5x5_2(self.branch5x5_1(x))
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        pooled = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), five, double, pooled], dim=1)


class ReductionB(nn.Module):
    """35×35 → 17×17 reduction: strided 3×3, strided double 3×3 and a 3×3/2 max pool (Mixed_6a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3 = BasicConv2d(in_channels, 384, 3, stride=2)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 64, 1)
        self.branch3x3dbl_2 = BasicConv2d(64, 96, 3, padding=1)
        self.branch3x3dbl_3 = BasicConv2d(96, 96, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        double = self.branch3x3dbl_3(self.branch3x3dbl_2(self.branch3x3dbl_1(x)))
        return torch.cat([self.branch3x3(x), double, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class MixedC(nn.Module):
    """17×17 block with factorised 7×7 convolutions (1×7 then 7×1) of width `channels_7x7` (Mixed_6b-6e)."""

    def __init__(self, in_channels: int, channels_7x7: int) -> None:
        super().__init__()
        c7 = channels_7x7
        row, col = dict(kernel_size=(1, 7), padding=(0, 3)), dict(kernel_size=(7, 1), padding=(3, 0))
        self.branch1x1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7_2 = BasicConv2d(c7, c7, **row)
        self.branch7x7_3 = BasicConv2d(c7, 192, **col)
        self.branch7x7dbl_1 = BasicConv2d(in_channels, c7, 1)
        self.branch7x7dbl_2 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_3 = BasicConv2d(c7, c7, **row)
        self.branch7x7dbl_4 = BasicConv2d(c7, c7, **col)
        self.branch7x7dbl_5 = BasicConv2d(c7, 192, **row)
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        single = self.branch7x7_3(self.branch7x7_2(self.branch7x7_1(x)))
        double = self.branch7x7dbl_1(x)
        for conv in (self.branch7x7dbl_2, self.branch7x7dbl_3, self.branch7x7dbl_4, self.branch7x7dbl_5):
            double = conv(double)
        pooled = self.branch_pool(_tf_avg_pool(x))
        return torch.cat([self.branch1x1(x), single, double, pooled], dim=1)


class ReductionD(nn.Module):
    """17×17 → 8×8 reduction: strided 3×3, 7×7-then-strided-3×3 and a 3×3/2 max pool (Mixed_7a)."""

    def __init__(self, in_channels: int) -> None:
        super().__init__()
        self.branch3x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch3x3_2 = BasicConv2d(192, 320, 3, stride=2)
        self.branch7x7x3_1 = BasicConv2d(in_channels, 192, 1)
        self.branch7x7x3_2 = BasicConv2d(192, 192, kernel_size=(1, 7), padding=(0, 3))
        self.branch7x7x3_3 = BasicConv2d(192, 192, kernel_size=(7, 1), padding=(3, 0))
        self.branch7x7x3_4 = BasicConv2d(192, 192, 3, stride=2)

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3_2(self.branch3x3_1(x))
        seven = self.branch7x7x3_4(self.branch7x7x3_3(self.branch7x7x3_2(self.branch7x7x3_1(x))))
        return torch.cat([three, seven, F.max_pool2d(x, kernel_size=3, stride=2)], dim=1)


class MixedE(nn.Module):
    """8×8 block whose 3×3 branches split into parallel 1×3 and 3×1 outputs; pooling branch average or max."""

    def __init__(self, in_channels: int, pool: str) -> None:
        super().__init__()
        if pool not in ("avg", "max"):
            raise ValueError(f"MixedE pool must be 'avg' or 'max', got {pool!r}")
        self.pool = pool
        row, col = dict(kernel_size=(1, 3), padding=(0, 1)), dict(kernel_size=(3, 1), padding=(1, 0))
        self.branch1x1 = BasicConv2d(in_channels, 320, 1)
        self.branch3x3_1 = BasicConv2d(in_channels, 384, 1)
        self.branch3x3_2a = BasicConv2d(384, 384, **row)
        self.branch3x3_2b = BasicConv2d(384, 384, **col)
        self.branch3x3dbl_1 = BasicConv2d(in_channels, 448, 1)
        self.branch3x3dbl_2 = BasicConv2d(448, 384, 3, padding=1)
        self.branch3x3dbl_3a = BasicConv2d(384, 384, **row)
        self.branch3x3dbl_3b = BasicConv2d(384, 384, **col)
        self.branch_pool = BasicConv2d(in_channels, 192, 1)

    def forward(self, x: Tensor) -> Tensor:
        three = self.branch3x3_1(x)
        three = torch.cat([self.branch3x3_2a(three), self.branch3x3_2b(three)], dim=1)
        double = self.branch3x3dbl_2(self.branch3x3dbl_1(x))
        double = torch.cat([self.branch3x3dbl_3a(double), self.branch3x3dbl_3b(double)], dim=1)
        if self.pool == "avg":
            pooled = _tf_avg_pool(x)
        else:  # the FID graph's last block max-pools here (a quirk of that TensorFlow graph, kept for fidelity)
            pooled = F.max_pool2d(x, kernel_size=3, stride=1, padding=1)
        return torch.cat([self.branch1x1(x), three, double, self.branch_pool(pooled)], dim=1)


# pytorch-fid's `--dims` → our layer name; its blocks 0, 1, 2 end at these modules, block 3 at the final avgpool.
PYTORCH_FID_DIMS: dict[int, str] = {64: "fid64", 192: "fid192", 768: "fid768", 2048: "fid2048"}
_PYTORCH_FID_BLOCK_ENDS = {"maxpool1": "fid64", "maxpool2": "fid192", "Mixed_6e": "fid768"}

# Modules in execution order (torchvision's names), each a layer.
_BODY = (
    "Conv2d_1a_3x3", "Conv2d_2a_3x3", "Conv2d_2b_3x3", "maxpool1", "Conv2d_3b_1x1", "Conv2d_4a_3x3", "maxpool2",
    "Mixed_5b", "Mixed_5c", "Mixed_5d", "Mixed_6a", "Mixed_6b", "Mixed_6c", "Mixed_6d", "Mixed_6e",
    "Mixed_7a", "Mixed_7b", "Mixed_7c",
)  # fmt: skip


class FIDInceptionV3(nn.Module):
    """FID Inception-v3 on [N, 3, H, W] uint8 (or float 0..255) images of any size; returns the logits."""

    resolution = INPUT_SIZE

    def __init__(self, num_classes: int = FID_INCEPTION_CLASSES) -> None:
        super().__init__()
        self.config: dict[str, Any] = {"num_classes": int(num_classes)}
        self.preprocessing = PREPROCESSING
        self.Conv2d_1a_3x3 = BasicConv2d(3, 32, 3, stride=2)
        self.Conv2d_2a_3x3 = BasicConv2d(32, 32, 3)
        self.Conv2d_2b_3x3 = BasicConv2d(32, 64, 3, padding=1)
        self.maxpool1 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Conv2d_3b_1x1 = BasicConv2d(64, 80, 1)
        self.Conv2d_4a_3x3 = BasicConv2d(80, 192, 3)
        self.maxpool2 = nn.MaxPool2d(kernel_size=3, stride=2)
        self.Mixed_5b = MixedA(192, pool_features=32)
        self.Mixed_5c = MixedA(256, pool_features=64)
        self.Mixed_5d = MixedA(288, pool_features=64)
        self.Mixed_6a = ReductionB(288)
        self.Mixed_6b = MixedC(768, channels_7x7=128)
        self.Mixed_6c = MixedC(768, channels_7x7=160)
        self.Mixed_6d = MixedC(768, channels_7x7=160)
        self.Mixed_6e = MixedC(768, channels_7x7=192)
        self.Mixed_7a = ReductionD(768)
        self.Mixed_7b = MixedE(1280, pool="avg")
        self.Mixed_7c = MixedE(2048, pool="max")
        self.avgpool = nn.AdaptiveAvgPool2d((1, 1))
        self.fc = nn.Linear(2048, int(num_classes))

    def preprocess(self, images: Tensor) -> Tensor:
        """pytorch-fid's input: x / 255, bilinear resize to 299×299 (align_corners=False), then 2x − 1."""
        x = images_as_float(images, FAMILY) / 255
        x = F.interpolate(x, size=(INPUT_SIZE, INPUT_SIZE), mode="bilinear", align_corners=False)
        return 2 * x - 1

    def forward(self, images: Tensor) -> Tensor:
        x = self.preprocess(images)
        for name in _BODY:
            x = getattr(self, name)(x)
        return self.fc(torch.flatten(self.avgpool(x), 1))

    def layer_paths(self) -> dict[str, str]:
        """Layer name → module path, in execution order (each `fidD` right after the module it is read from)."""
        paths: dict[str, str] = {}
        for name in _BODY:
            paths[name] = name
            if name in _PYTORCH_FID_BLOCK_ENDS:
                paths[_PYTORCH_FID_BLOCK_ENDS[name]] = name
        return {**paths, "pool3": "avgpool", "fid2048": "avgpool", "logits": "fc"}

    def layer_value(self, name: str, output: Tensor) -> Tensor:
        """`pool3` is the [N, 2048, 1, 1] average flattened to [N, 2048]; `fidD` is pytorch-fid's --dims D feature
        (fid_score's 1×1 adaptive average pool of the block's map, flattened); every other layer is its module
        output."""
        if name in PYTORCH_FID_DIMS.values():
            if output.shape[-2:] != (1, 1):  # fid_score pools only maps larger than 1×1
                output = F.adaptive_avg_pool2d(output, output_size=(1, 1))
            return torch.flatten(output, 1)
        return torch.flatten(output, 1) if name == "pool3" else output


def build(config: Mapping[str, Any]) -> FIDInceptionV3:
    """The network for a config (constructor kwargs)."""
    return FIDInceptionV3(**dict(config))


def random_state_dict(config: Mapping[str, Any], seed: int) -> dict[str, Tensor]:
    """Seeded random weights, bit-identical on every machine and torch build (extractor/models/seeded.py's rule).

    With z the seeded N(0, 1) draw of state-dict key i (`seeded.standard_normal(seed, i, shape)`): conv weights
    z·√(2 / fan_in) (He), fc weight z·(1 / √fan_in), fc bias 0.1·z, BatchNorm weight 1 + 0.1·z, bias 0.1·z,
    running_mean 0.1·z, running_var 1 + 0.2·z + 0.02·z² (exp(0.2·z) to second order, ≥ 0.5 for every z, and only
    correctly rounded ops), num_batches_tracked 0. Scale factors are Python floats, rounded once to float32.
    """
    with torch.device("meta"):
        shapes = {key: (tuple(t.shape), t.dtype) for key, t in build(config).state_dict().items()}
    weights = {}
    for index, (key, (shape, dtype)) in enumerate(shapes.items()):
        if key.endswith("num_batches_tracked"):
            weights[key] = torch.zeros(shape, dtype=dtype)
            continue
        z = seeded.standard_normal(seed, index, shape)
        fan_in = math.prod(shape[1:]) if len(shape) > 1 else 1
        # In place where possible (fresh memory is slow to touch); each op is one correctly rounded float32 step.
        if key.endswith("conv.weight"):
            value = z.mul_(math.sqrt(2 / fan_in))
        elif key == "fc.weight":
            value = z.mul_(1 / math.sqrt(fan_in))
        elif key.endswith("bn.weight"):
            value = z.mul_(0.1).add_(1)
        elif key.endswith("running_var"):
            value = torch.mul(z, 0.02).add_(0.2).mul_(z).add_(1)  # Horner form of 1 + 0.2·z + 0.02·z²
        else:  # bn.bias, running_mean, fc.bias
            value = z.mul_(0.1)
        weights[key] = value
    return weights


def claims_state_dict(state_dict: Mapping[str, Tensor]) -> bool:
    """True when the keys are an Inception-v3 state dict (torchvision names): any of its signature keys, so that
    one that lacks another key is told which (by the state dict check) instead of being taken for an EDM network."""
    return any(key in state_dict for key in _SIGNATURE_KEYS)


def canonical_state_dict(state_dict: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """The state dict with BatchNorm's `num_batches_tracked` counters added where the file has none (unused)."""
    out = dict(state_dict)
    for key in state_dict:
        if key.endswith(".bn.running_mean"):
            out.setdefault(key.removesuffix("running_mean") + "num_batches_tracked", torch.zeros((), dtype=torch.long))
    return out


def config_from_state_dict(state_dict: Mapping[str, Tensor], path: str | Path = "<memory>") -> dict[str, Any]:
    """The config of an FID Inception state dict; NotFIDInceptionError for other Inception-v3 weights."""
    if "fc.weight" not in state_dict:
        raise CheckpointMismatchError(f"{path}: an Inception-v3 state dict without its classifier (fc.weight): not the FID network's whole weights")
    classes = int(state_dict["fc.weight"].shape[0])
    aux = [key for key in state_dict if key.startswith("AuxLogits.")]
    if classes != FID_INCEPTION_CLASSES or aux:
        raise NotFIDInceptionError(
            f"{path}: an Inception-v3 with {classes} classes{' and an auxiliary classifier' if aux else ''}, not the "
            f"FID network ({FID_INCEPTION_CLASSES} classes, no AuxLogits: pt_inception-2015-12-05-6726825d.pth); "
            "torchvision's ImageNet weights give different features and are not accepted"
        )
    return {"num_classes": classes}
