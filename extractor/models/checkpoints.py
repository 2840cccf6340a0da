"""Safe loading of EDM / DMD2 generator checkpoints into `EDMPrecond`.

Nothing here ever runs code from a checkpoint: torch files go through `torch.load(weights_only=True)`,
safetensors through `safetensors`, and EDM's network pickles (which embed their Python source) through a
restricted unpickler that only rebuilds tensors and plain containers.
"""

from __future__ import annotations

import collections
import contextlib
import functools
import io
import pickle
import posixpath
import re
import shutil
import tempfile
from collections.abc import Callable, Iterator, Mapping
from pathlib import Path
from typing import Any, TypeVar

import numpy as np
import torch
from torch import Tensor

from extractor.models.edm import CONFIG_KEYS, EDMPrecond
from schemas.output_paths import local_file_url_to_path
from schemas.errors import ImzarrError
from schemas.output_paths import is_remote_url

__all__ = [
    "CheckpointError",
    "CheckpointMismatchError",
    "UnsafeCheckpointError",
    "check_state_dict",
    "infer_config",
    "is_edm_network_pickle",
    "load_checkpoint",
    "local_checkpoint",
    "normalize_state_dict",
    "read_checkpoint",
    "read_plain_state_dict",
    "reads_urls_too",
    "resolve_checkpoint_file",
]

# In a DMD2/accelerate checkpoint folder the generator is model 0; `*_1` files hold the guidance/critic.
_FOLDER_CANDIDATES = ("pytorch_model.bin", "model.safetensors")
_PICKLE_SUFFIXES = (".pkl", ".pickle")
# Keys under which training scripts nest the generator's state dict, most specific first.
_CONTAINER_KEYS = ("ema", "generator", "state_dict", "model")
# Key segments that DDP (`module`) and torch.compile (`_orig_mod`) insert around a wrapped submodule.
_WRAPPER_SEGMENTS = ("module", "_orig_mod")
_GENERATOR_PREFIX = "feedforward_model."
_MAX_LISTED_KEYS = 5


class CheckpointError(ImzarrError, ValueError):
    """A checkpoint that cannot be read or does not hold a state dict of a supported network (exit code 2)."""


class UnsafeCheckpointError(CheckpointError):
    """A checkpoint whose unpickling would need to run code (refused, never executed)."""


class CheckpointMismatchError(CheckpointError):
    """A state dict whose keys or shapes do not fit the model config."""


# ---------------------------------------------------------------------------------------------------------------
# Locating and reading files.


def resolve_checkpoint_file(path: str | Path) -> Path | str:
    """The weights file for `path`: the file itself, or the generator file inside a DMD2 checkpoint folder
    (a URL for a checkpoint in object storage: read it through `local_checkpoint`)."""
    path = local_file_url_to_path(path)
    if not str(path):
        raise CheckpointError("--checkpoint '': names no file; give the checkpoint file or DMD2 checkpoint folder")
    if is_remote_url(path):
        return _resolve_remote_checkpoint(str(path))
    path = Path(path)
    if path.exists() and not (path.is_dir() or path.is_file()):
        raise CheckpointError(f"{path}: not a regular file (a device, FIFO or socket); give the checkpoint file or DMD2 checkpoint folder")
    if path.is_dir():
        found = [name for name in _FOLDER_CANDIDATES if (path / name).is_file()]
        if found:
            return path / _one_candidate(str(path), found)
        present = sorted(p.name for p in path.iterdir())[:20]
        raise CheckpointError(
            f"{path}: folder holds none of {list(_FOLDER_CANDIDATES)} (the generator); found {present}"
        )
    if not path.is_file():
        raise CheckpointError(f"{path}: no such checkpoint file or folder")
    return path


def _one_candidate(folder: str, found: list[str]) -> str:
    """The generator's weights file of a checkpoint folder; two (a .bin and a .safetensors, which may hold other
    weights) are refused rather than one picked by a rule nobody sees."""
    if len(found) > 1:
        raise CheckpointError(f"{folder}: folder holds both {' and '.join(found)}; name the file to use (e.g. --checkpoint {folder.rstrip('/')}/{found[0]})")
    return found[0]


def _resolve_remote_checkpoint(url: str) -> str:
    import fsspec

    fs, key = fsspec.core.url_to_fs(url)
    try:
        entry = fs.info(key)
        if entry.get("type") != "directory":
            return url
        names = {posixpath.basename(e["name"].rstrip("/")) for e in fs.ls(key, detail=True) if e.get("type") == "file"}
    except FileNotFoundError:
        raise CheckpointError(f"{url}: no such checkpoint file or folder") from None
    except OSError as exc:  # a bucket we may not read, a refused connection
        raise CheckpointError(f"{url}: cannot read ({exc.strerror or exc})") from None
    found = [name for name in _FOLDER_CANDIDATES if name in names]
    if found:
        return f"{url.rstrip('/')}/{_one_candidate(url, found)}"
    raise CheckpointError(f"{url}: folder holds none of {list(_FOLDER_CANDIDATES)} (the generator); found {sorted(names)[:20]}")


@contextlib.contextmanager
def local_checkpoint(path: str | Path) -> Iterator[Path]:
    """The weights file of a checkpoint on local disk: itself for a local path; for a URL, a copy in a temporary
    folder this call makes and removes on exit (never beside the input), so torch, safetensors and the safe
    unpickler read it as any file. Errors name the URL, not the copy."""
    file = resolve_checkpoint_file(path)
    if not isinstance(file, str):
        yield file
        return
    import fsspec

    folder = tempfile.mkdtemp(prefix="imzarr-checkpoint-")
    copy = Path(folder) / (posixpath.basename(file) or "checkpoint")
    try:
        fs, key = fsspec.core.url_to_fs(file)
        try:
            fs.get_file(key, str(copy))
        except FileNotFoundError:
            raise CheckpointError(f"{file}: no such checkpoint file or folder") from None
        except PermissionError as exc:
            raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc})") from None
        try:
            yield copy
        except CheckpointError as exc:
            raise type(exc)(str(exc).replace(str(copy), file)) from None
    finally:
        shutil.rmtree(folder, ignore_errors=True)


Result = TypeVar("Result")


def reads_urls_too(read: Callable[..., Result]) -> Callable[..., Result]:
    """`read(path, …)` of a local checkpoint, also given a URL: then it reads a local copy (`local_checkpoint`).
    What it returns outlives the copy: tensors are read into memory, and a memory-mapped file's pages stay
    readable after the copy is removed (POSIX keeps an unlinked file's pages while they are mapped)."""

    @functools.wraps(read)
    def read_local_or_copy(path: str | Path, *args: Any, **kwargs: Any) -> Result:
        if is_remote_url(path):
            with local_checkpoint(path) as file:
                return read(file, *args, **kwargs)
        return read(path, *args, **kwargs)

    return read_local_or_copy


@reads_urls_too
def read_checkpoint(path: str | Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    """Read a checkpoint safely: (normalised `model.*` state dict, constructor kwargs if the file records them)."""
    file = resolve_checkpoint_file(path)
    suffix = file.suffix.lower()
    init_kwargs: dict[str, Any] | None = None
    if suffix != ".safetensors":
        _check_recognised(file)
    if suffix == ".safetensors":
        obj: Any = _read_safetensors(file)
    elif suffix in _PICKLE_SUFFIXES and not _is_zip(file):
        obj, init_kwargs = _read_edm_pickle(file)
    else:
        obj = _read_torch(file)
    return normalize_state_dict(obj, file), init_kwargs


_ZIP_MAGIC = b"PK\x03\x04"
# A pickle of protocol 2 or newer (torch's legacy format, EDM's network pickles) opens with PROTO (0x80) and its version.
_PICKLE_PROTOCOLS = range(2, 6)


def _check_recognised(file: Path) -> None:
    """A torch zip or a pickle passes; a file that is neither (random bytes, text, an image) is refused as not a
    checkpoint, before any unpickler sees it."""
    with file.open("rb") as fh:
        head = fh.read(4)
    if head == _ZIP_MAGIC or (len(head) >= 2 and head[0] == pickle.PROTO[0] and head[1] in _PICKLE_PROTOCOLS):
        return
    what = "an empty file" if not head else f"starts with {head.hex(' ')}"
    raise CheckpointError(f"{file}: not a checkpoint (unrecognised format: {what}; expected a torch zip or pickle, an EDM .pkl or .safetensors)")


def _is_zip(file: Path) -> bool:
    """torch.save's default container (whatever the file is called)."""
    with file.open("rb") as fh:
        return fh.read(4) == _ZIP_MAGIC


def _read_safetensors(file: Path) -> dict[str, Tensor]:
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return load_file(str(file), device="cpu")
    except (SafetensorError, OSError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable safetensors file ({exc})") from exc


def _read_torch(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{file}: refused; torch.load(weights_only=True) cannot read it without running code "
            f"(only plain state dicts and containers of tensors are accepted): {_unsafe_reason(exc)}"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable torch checkpoint ({_first_line(exc)})") from exc


def _unsafe_reason(exc: BaseException) -> str:
    """What torch's weights-only reader met, in a few words: the class the pickle names (torch's own message goes on
    to advise loading it with code enabled, which this tool never does)."""
    found = re.search(r"(?i:unsupported) (?:global: )?GLOBAL ([\w.]+)", str(exc))
    named = f"an object of {found.group(1)}" if found else "objects other than tensors and plain containers"
    return f"it holds {named} (a whole pickled module, a custom class or code), not only tensors; save model.state_dict() instead"


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


# ---------------------------------------------------------------------------------------------------------------
# EDM network pickles: a restricted unpickler that rebuilds weights without executing the embedded source.


class _PersistentObj:
    """Stands in for an EDM persistent-class instance: keeps only its class name and __dict__ state."""

    def __init__(self, class_name: str, state: Mapping[str, Any]) -> None:
        self.class_name = class_name
        self.state = state


def _reconstruct_persistent_obj(meta: Any) -> _PersistentObj:
    # Replaces torch_utils.persistence._reconstruct_persistent_obj, which would exec(meta['module_src']).
    if not isinstance(meta, Mapping) or not isinstance(meta.get("state"), Mapping):
        raise pickle.UnpicklingError("persistent object without a state dict")
    return _PersistentObj(str(meta.get("class_name", "?")), meta["state"])


class _TorchModuleStub:
    """Stands in for a torch.nn module (e.g. ModuleDict): keeps the state pickle hands to __setstate__."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        self.state: Mapping[str, Any] = {}

    def __setstate__(self, state: Any) -> None:
        self.state = state if isinstance(state, Mapping) else {}


class _PlainDict(dict):
    """dnnlib.util.EasyDict without attribute access; tolerates a BUILD state."""

    def __setstate__(self, state: Any) -> None:
        if isinstance(state, Mapping):
            self.update(state)


class _NumpyDtype:
    """Inert record of a numpy dtype constructor call; only its type code is used."""

    def __init__(self, code: Any = None, *args: Any) -> None:
        self.code = code if isinstance(code, str) else None

    def __setstate__(self, state: Any) -> None:
        pass


_NUMPY_SCALAR_CODES = {"f2", "f4", "f8", "i1", "i2", "i4", "i8", "u1", "u2", "u4", "u8", "b1"}


def _numpy_scalar(dtype: Any, data: Any = None) -> Any:
    """Decode a pickled numpy scalar of a plain numeric dtype into a Python number; anything else becomes None."""
    if isinstance(dtype, _NumpyDtype) and dtype.code in _NUMPY_SCALAR_CODES and isinstance(data, bytes):
        return np.frombuffer(data, dtype=np.dtype(dtype.code))[0].item()
    return None


def _load_storage_bytes(data: bytes) -> Any:
    # The original (torch.storage._load_from_bytes) uses a full unpickler; the bytes are a torch.save'd storage.
    return torch.load(io.BytesIO(data), map_location="cpu", weights_only=True)


def _rebuild_tensor(storage: Any, offset: int, size: Any, stride: Any, *_ignored: Any) -> Tensor:
    # Drops requires_grad and backward hooks: only the values matter.
    return torch._utils._rebuild_tensor_v2(storage, offset, size, stride, False, collections.OrderedDict())


def _rebuild_parameter(data: Tensor, *_ignored: Any) -> Tensor:
    if not isinstance(data, Tensor):
        raise pickle.UnpicklingError("parameter data is not a tensor")
    return data


_ALLOWED_GLOBALS: dict[tuple[str, str], Any] = {
    ("torch_utils.persistence", "_reconstruct_persistent_obj"): _reconstruct_persistent_obj,
    ("collections", "OrderedDict"): collections.OrderedDict,
    ("builtins", "set"): set,
    ("builtins", "frozenset"): frozenset,
    ("_codecs", "encode"): lambda text, encoding="latin1": str(text).encode(str(encoding)),
    ("torch._utils", "_rebuild_tensor_v2"): _rebuild_tensor,
    ("torch._utils", "_rebuild_parameter"): _rebuild_parameter,
    ("torch._utils", "_rebuild_parameter_with_state"): _rebuild_parameter,
    ("torch.storage", "_load_from_bytes"): _load_storage_bytes,
    ("dnnlib.util", "EasyDict"): _PlainDict,
    ("numpy", "dtype"): _NumpyDtype,
    ("numpy.core.multiarray", "scalar"): _numpy_scalar,
    ("numpy._core.multiarray", "scalar"): _numpy_scalar,
}


class _RestrictedUnpickler(pickle.Unpickler):
    """Resolves only the globals in _ALLOWED_GLOBALS (all replaced by inert stand-ins) and torch.nn classes."""

    def __init__(self, file: Any, path: Path) -> None:
        super().__init__(file)
        self._path = path

    def find_class(self, module: str, name: str) -> Any:
        if (module, name) in _ALLOWED_GLOBALS:
            return _ALLOWED_GLOBALS[(module, name)]
        if module.startswith("torch.nn.modules.") and re.fullmatch(r"[A-Z][A-Za-z0-9_]*", name):
            return _TorchModuleStub
        raise UnsafeCheckpointError(
            f"{self._path}: refused; the pickle references {module}.{name}, which is not an allowed "
            "weights-only global (nothing was executed)"
        )

    def persistent_load(self, pid: Any) -> Any:
        raise UnsafeCheckpointError(f"{self._path}: refused; unexpected persistent id {pid!r} in pickle")


def _read_edm_pickle(file: Path) -> tuple[dict[str, Tensor], dict[str, Any] | None]:
    try:
        with file.open("rb") as fh:
            obj = _RestrictedUnpickler(fh, file).load()
    except UnsafeCheckpointError:
        raise
    except Exception as exc:  # a malformed pickle can fail in many ways; none of them ran foreign code
        raise CheckpointError(f"{file}: not a readable EDM network pickle ({type(exc).__name__}: {exc})") from exc

    root = obj.get("ema") if isinstance(obj, Mapping) else obj
    if isinstance(root, Mapping) and all(isinstance(v, Tensor) for v in root.values()):
        return dict(root), None
    if not isinstance(root, (_PersistentObj, _TorchModuleStub)):
        raise CheckpointError(f"{file}: pickle holds no EDM network under 'ema' (got {type(root).__name__})")
    state_dict: dict[str, Tensor] = {}
    _collect_module_state(root, "", state_dict, file)
    init_kwargs = root.state.get("_init_kwargs")
    return state_dict, dict(init_kwargs) if isinstance(init_kwargs, Mapping) else None


def _collect_module_state(node: Any, prefix: str, out: dict[str, Tensor], file: Path) -> None:
    """Walk pickled module states in nn.Module.state_dict order: parameters, persistent buffers, submodules."""
    state = node.state
    skipped = state.get("_non_persistent_buffers_set") or set()
    for group in ("_parameters", "_buffers"):
        for name, value in (state.get(group) or {}).items():
            if value is None or (group == "_buffers" and name in skipped):
                continue
            if not isinstance(value, Tensor):
                raise CheckpointError(f"{file}: {prefix}{name} is a {type(value).__name__}, not a tensor")
            out[prefix + name] = value
    for name, child in (state.get("_modules") or {}).items():
        if child is None:
            continue
        if not isinstance(child, (_PersistentObj, _TorchModuleStub)):
            raise CheckpointError(f"{file}: submodule {prefix}{name} is a {type(child).__name__}")
        _collect_module_state(child, f"{prefix}{name}.", out, file)


# ---------------------------------------------------------------------------------------------------------------
# Normalising containers and key prefixes.


def _is_state_dict(obj: Any) -> bool:
    return isinstance(obj, Mapping) and len(obj) > 0 and all(
        isinstance(k, str) and isinstance(v, Tensor) for k, v in obj.items()
    )


def _strip_wrappers(keys_to_tensors: dict[str, Tensor]) -> dict[str, Tensor]:
    """Drop DDP (`module.`) and torch.compile (`_orig_mod.`) segments wherever they wrap a submodule."""
    out = {}
    for key, value in keys_to_tensors.items():
        parts = [p for p in key.split(".") if p not in _WRAPPER_SEGMENTS]
        out[".".join(parts)] = value
    return out


def normalize_state_dict(obj: Any, path: str | Path = "<memory>") -> dict[str, Tensor]:
    """Find the generator state dict in a loaded checkpoint object and give it EDMPrecond's `model.*` keys."""
    found = obj
    for _ in range(4):  # containers nest at most a few levels (e.g. {'state_dict': {'ema': {...}}})
        if _is_state_dict(found):
            break
        if not isinstance(found, Mapping):
            raise CheckpointError(f"{path}: expected a state dict or a dict holding one, got {type(found).__name__}")
        key = next((k for k in _CONTAINER_KEYS if k in found and isinstance(found[k], Mapping)), None)
        if key is None:
            tensors = {k: v for k, v in found.items() if isinstance(k, str) and isinstance(v, Tensor)}
            if tensors:
                found = tensors  # a state dict with a few extra non-tensor entries
                break
            raise CheckpointError(
                f"{path}: no state dict found; top-level keys {sorted(map(str, found))[:10]}, "
                f"expected tensors or one of {list(_CONTAINER_KEYS)}"
            )
        found = found[key]
    if not _is_state_dict(found):
        raise CheckpointError(f"{path}: no state dict found within {len(_CONTAINER_KEYS)} levels of nesting")

    state = _strip_wrappers(dict(found))
    if any(k.startswith(_GENERATOR_PREFIX) for k in state):
        # A whole DMD2 training model: keep the generator, drop the guidance/critic networks.
        state = {k[len(_GENERATOR_PREFIX):]: v for k, v in state.items() if k.startswith(_GENERATOR_PREFIX)}
    if not any(k.startswith("model.") for k in state):
        if not any(k.startswith(("map_layer0.", "enc.", "dec.")) for k in state):
            raise CheckpointError(
                f"{path}: does not look like an EDM DhariwalUNet state dict "
                f"(first keys {list(state)[:_MAX_LISTED_KEYS]})"
            )
        state = {f"model.{k}": v for k, v in state.items()}
    return state


# ---------------------------------------------------------------------------------------------------------------
# Config inference and strict loading.

_ENC_CONV = re.compile(r"model\.enc\.(\d+)x\1_conv\.weight")
_DEC_BLOCK = re.compile(r"model\.dec\.(\d+)x\1_block(\d+)\.conv1\.weight")
_ATTN = re.compile(r"model\.(?:enc|dec)\.(\d+)x\1_block\d+\.qkv\.weight")


def infer_config(state_dict: Mapping[str, Tensor], path: str | Path = "<memory>") -> dict[str, Any]:
    """EDMPrecond kwargs implied by the tensor shapes of a normalised (`model.*`) state dict.

    Not recoverable from shapes (and set to inference defaults): dropout 0, label_dropout 0, sigma_data 0.5,
    use_fp16 False. Attention requested at widths below 64 channels has no parameters and is left out
    (it computes nothing, so the network is the same).
    """
    convs = [(m, state_dict[m.group(0)]) for k in state_dict if (m := _ENC_CONV.fullmatch(k))]
    if len(convs) != 1 or "model.map_layer0.weight" not in state_dict:
        raise CheckpointError(
            f"{path}: cannot infer the config: expected one model.enc.RxR_conv.weight and model.map_layer0.weight"
        )
    match, conv = convs[0]
    resolution = int(match.group(1))
    model_channels = int(state_dict["model.map_layer0.weight"].shape[1])
    emb_channels = int(state_dict["model.map_layer0.weight"].shape[0])

    dec_blocks: dict[int, dict[int, int]] = collections.defaultdict(dict)
    for key, tensor in state_dict.items():
        if m := _DEC_BLOCK.fullmatch(key):
            dec_blocks[int(m.group(1))][int(m.group(2))] = int(tensor.shape[0])
    levels = []
    res = resolution
    while res in dec_blocks:
        levels.append(res)
        res //= 2
    if not levels or len(levels) != len(dec_blocks):
        raise CheckpointError(f"{path}: decoder block resolutions {sorted(dec_blocks)} do not halve from {resolution}")
    num_blocks = len(dec_blocks[resolution]) - 1
    channel_mult = []
    for res in levels:
        width = dec_blocks[res][0]
        if width % model_channels or len(dec_blocks[res]) != num_blocks + 1:
            raise CheckpointError(f"{path}: decoder blocks at {res}x{res} do not fit model_channels {model_channels}")
        channel_mult.append(width // model_channels)

    label = state_dict.get("model.map_label.weight")
    augment = state_dict.get("model.map_augment.weight")
    attn = sorted({int(m.group(1)) for k in state_dict if (m := _ATTN.fullmatch(k))}, reverse=True)
    return dict(
        img_resolution=resolution,
        img_channels=int(conv.shape[1]),
        label_dim=int(label.shape[1]) if label is not None else 0,
        use_fp16=False,
        sigma_min=0.0,
        sigma_max=float("inf"),
        sigma_data=0.5,
        model_type="DhariwalUNet",
        augment_dim=int(augment.shape[1]) if augment is not None else 0,
        model_channels=model_channels,
        channel_mult=channel_mult,
        channel_mult_emb=emb_channels // model_channels,
        num_blocks=num_blocks,
        attn_resolutions=attn,
        dropout=0.0,
        label_dropout=0.0,
    )


def check_state_dict(model: torch.nn.Module, state_dict: Mapping[str, Tensor], path: str | Path) -> None:
    """Raise CheckpointMismatchError naming the first missing, unexpected and mis-shaped keys, if any."""
    expected = model.state_dict()
    missing = [k for k in expected if k not in state_dict]
    unexpected = [k for k in state_dict if k not in expected]
    misshaped = [
        f"{k} {tuple(state_dict[k].shape)} vs model {tuple(v.shape)}"
        for k, v in expected.items()
        if k in state_dict and tuple(state_dict[k].shape) != tuple(v.shape)
    ]
    # Loading casts silently: integer weights would be rounded values, complex ones would lose their imaginary part.
    mistyped = [
        f"{k} {state_dict[k].dtype}"
        for k, v in expected.items()
        if k in state_dict and v.is_floating_point() and not state_dict[k].is_floating_point()
    ]
    if not (missing or unexpected or misshaped or mistyped):
        return
    parts = []
    for label, items in (("missing", missing), ("unexpected", unexpected), ("mis-shaped", misshaped), ("not floating-point", mistyped)):
        if items:
            shown = ", ".join(items[:_MAX_LISTED_KEYS])
            more = f" (+{len(items) - _MAX_LISTED_KEYS} more)" if len(items) > _MAX_LISTED_KEYS else ""
            parts.append(f"{len(items)} {label}: {shown}{more}")
    raise CheckpointMismatchError(f"{path}: state dict does not fit the config; " + "; ".join(parts))


def _config_from_init_kwargs(init_kwargs: Mapping[str, Any], path: Path) -> dict[str, Any]:
    if init_kwargs.get("model_type", "DhariwalUNet") != "DhariwalUNet":
        raise CheckpointError(f"{path}: model_type {init_kwargs.get('model_type')!r} is not supported")
    return {k: v for k, v in init_kwargs.items() if k in CONFIG_KEYS}


@reads_urls_too
def load_checkpoint(
    path: str | Path, config: Mapping[str, Any] | None = None, device: torch.device | str = "cpu"
) -> EDMPrecond:
    """Build an EDMPrecond from a checkpoint file or DMD2 folder (config: given, recorded, or inferred); eval mode."""
    file = resolve_checkpoint_file(path)
    state_dict, init_kwargs = read_checkpoint(file)
    if config is None:
        config = _config_from_init_kwargs(init_kwargs, file) if init_kwargs else infer_config(state_dict, file)
    with torch.device("meta"):
        model = EDMPrecond(**dict(config))
    check_state_dict(model, state_dict, file)
    state_dict = {k: v.to(device=device, dtype=torch.float32) for k, v in state_dict.items()}
    model.load_state_dict(state_dict, strict=True, assign=True)
    return model.eval()


# ---------------------------------------------------------------------------------------------------------------
# State dicts of other networks (feature networks): read as stored, without EDM's key normalisation.


def is_edm_network_pickle(path: str | Path) -> bool:
    """True for an EDM network pickle (`.pkl`/`.pickle` that is not a torch zip), which only EDMPrecond reads.
    A URL's first four bytes are all that is fetched."""
    file = resolve_checkpoint_file(path)
    if posixpath.splitext(str(file))[1].lower() not in _PICKLE_SUFFIXES:
        return False
    if isinstance(file, Path):
        return not _is_zip(file)
    import fsspec

    fs, key = fsspec.core.url_to_fs(file)
    try:
        head = fs.cat_file(key, start=0, end=4)[:4]  # [:4]: a server may ignore the range and send it all
    except FileNotFoundError:
        raise CheckpointError(f"{file}: no such checkpoint file or folder") from None
    except PermissionError as exc:
        raise CheckpointError(f"{file}: cannot read ({exc.strerror or exc})") from None
    return head != _ZIP_MAGIC


@reads_urls_too
def read_plain_state_dict(path: str | Path) -> dict[str, Tensor]:
    """A torch/safetensors checkpoint's state dict, keys as stored (containers, DDP/compile prefixes removed)."""
    file = resolve_checkpoint_file(path)
    if is_edm_network_pickle(file):
        raise CheckpointError(f"{file}: an EDM network pickle, not a plain state dict")
    if file.suffix.lower() != ".safetensors":
        _check_recognised(file)
    if file.suffix.lower() == ".safetensors":
        found: Any = _read_safetensors(file)
    elif _is_zip(file):  # memory-mapped: deciding which network a file holds reads no weights
        found = _read_torch_mapped(file)
    else:
        found = _read_torch(file)
    for _ in range(4):  # containers nest at most a few levels
        if _is_state_dict(found):
            return _strip_wrappers(dict(found))
        if not isinstance(found, Mapping):
            break
        key = next((k for k in _CONTAINER_KEYS if isinstance(found.get(k), Mapping)), None)
        if key is None:
            break
        found = found[key]
    raise CheckpointError(f"{file}: no state dict (a mapping of names to tensors) found")


def _read_torch_mapped(file: Path) -> Any:
    try:
        return torch.load(file, map_location="cpu", weights_only=True, mmap=True)
    except pickle.UnpicklingError as exc:
        raise UnsafeCheckpointError(
            f"{file}: refused; torch.load(weights_only=True) cannot read it without running code: {_unsafe_reason(exc)}"
        ) from exc
    except (RuntimeError, OSError, EOFError, ValueError) as exc:
        raise CheckpointError(f"{file}: not a readable torch checkpoint ({_first_line(exc)})") from exc
