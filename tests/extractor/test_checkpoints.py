"""Checkpoint loading: every container format, prefixes, EDM pickles without running code, config inference."""

from __future__ import annotations

import collections
import hashlib
import os
import pickle
import re
from pathlib import Path

import pytest
import torch
from safetensors.torch import save_file

from extractor.models import (
    CheckpointError,
    CheckpointMismatchError,
    EDMPrecond,
    ModelSpec,
    UnsafeCheckpointError,
    cached_model,
    infer_config,
    load_checkpoint,
    load_model,
)
from tests.support.edm_pickles import edm_style

ARCH_KEYS = ("img_resolution", "img_channels", "label_dim", "model_channels", "channel_mult",
             "channel_mult_emb", "num_blocks", "attn_resolutions", "augment_dim")  # fmt: skip



@pytest.fixture(scope="module")
def sd(edm_reference: dict) -> dict[str, torch.Tensor]:
    return dict(edm_reference["state_dict"])


def _assert_same_weights(model: EDMPrecond, sd: dict[str, torch.Tensor]) -> None:
    got = model.state_dict()
    assert list(got) == list(sd)
    for key, value in sd.items():
        assert torch.equal(got[key], value), key


def _assert_reproduces_fixture(model: EDMPrecond, edm_reference: dict) -> None:
    with torch.no_grad():
        out = model(edm_reference["x"], edm_reference["sigma"], edm_reference["class_labels"])
    torch.testing.assert_close(out, edm_reference["out"], rtol=1e-4, atol=1e-5)


def _arch(config: dict) -> dict:
    return {k: config[k] for k in ARCH_KEYS}


# ---------------------------------------------------------------------------------------------------------------
# Containers.


def test_bare_state_dict_bin(tmp_path: Path, edm_reference: dict, sd: dict) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(collections.OrderedDict(sd), path)
    model = load_checkpoint(path)
    _assert_same_weights(model, sd)
    assert _arch(model.config) == _arch({**edm_reference["config"], "attn_resolutions": [16]})
    assert not model.training
    _assert_reproduces_fixture(model, edm_reference)


def test_folder_picks_generator_not_critic(tmp_path: Path, edm_reference: dict, sd: dict) -> None:
    folder = tmp_path / "checkpoint_model_000500"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    critic = {f"fake_unet.{k}": v + 1 for k, v in sd.items()} | {"cls_pred_branch.0.weight": torch.ones(3)}
    torch.save(critic, folder / "pytorch_model_1.bin")
    torch.save({"step": torch.tensor(500)}, folder / "optimizer.bin")
    _assert_same_weights(load_checkpoint(folder), sd)


def test_folder_with_only_the_critic_is_refused(tmp_path: Path, sd: dict) -> None:
    folder = tmp_path / "ckpt"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model_1.bin")
    with pytest.raises(CheckpointError, match="pytorch_model.bin") as info:
        load_checkpoint(folder)
    assert str(folder) in str(info.value)


def test_safetensors_file_and_folder(tmp_path: Path, edm_reference: dict, sd: dict) -> None:
    folder = tmp_path / "new_accelerate"
    folder.mkdir()
    save_file({k: v.contiguous() for k, v in sd.items()}, str(folder / "model.safetensors"))
    save_file({"real_unet.x": torch.zeros(2)}, str(folder / "model_1.safetensors"))
    _assert_same_weights(load_checkpoint(folder / "model.safetensors"), sd)
    model = load_checkpoint(folder)
    _assert_same_weights(model, sd)
    _assert_reproduces_fixture(model, edm_reference)
    torch.save({k: torch.zeros_like(v) for k, v in sd.items()}, folder / "pytorch_model.bin")  # other weights beside
    with pytest.raises(CheckpointError, match=r"folder holds both pytorch_model.bin and model.safetensors; name the file to use"):
        load_checkpoint(folder)
    _assert_same_weights(load_checkpoint(folder / "model.safetensors"), sd)


@pytest.mark.parametrize("key", ["state_dict", "model", "ema", "generator"])
def test_state_dict_nested_under_key(tmp_path: Path, sd: dict, key: str) -> None:
    path = tmp_path / "ckpt.pt"
    torch.save({key: sd, "step": 1234, "note": "x"}, path)
    _assert_same_weights(load_checkpoint(path), sd)


def test_state_dict_nested_twice_and_ema_preferred(tmp_path: Path, sd: dict) -> None:
    other = {k: torch.zeros_like(v) for k, v in sd.items()}
    path = tmp_path / "ckpt.pth"
    torch.save({"state_dict": {"model": other, "ema": sd}}, path)
    _assert_same_weights(load_checkpoint(path), sd)


@pytest.mark.parametrize("prefix", ["module.", "_orig_mod.", "module._orig_mod."])
def test_wrapper_prefixes_are_stripped(tmp_path: Path, sd: dict, prefix: str) -> None:
    path = tmp_path / "wrapped.pt"
    torch.save({prefix + k: v for k, v in sd.items()}, path)
    _assert_same_weights(load_checkpoint(path), sd)


def test_feedforward_model_selected_from_whole_dmd2_model(tmp_path: Path, sd: dict) -> None:
    whole = {f"feedforward_model.{k}": v for k, v in sd.items()}
    whole |= {f"guidance_model.real_unet.{k}": v * 2 for k, v in sd.items()}
    whole |= {f"guidance_model.fake_unet._orig_mod.{k}": v * 3 for k, v in sd.items()}
    path = tmp_path / "whole.pt"
    torch.save({"model": whole}, path)
    _assert_same_weights(load_checkpoint(path), sd)
    compiled = {f"module.feedforward_model._orig_mod.{k}": v for k, v in sd.items()}
    torch.save(compiled, path)
    _assert_same_weights(load_checkpoint(path), sd)


def test_missing_model_prefix_is_added(tmp_path: Path, sd: dict) -> None:
    path = tmp_path / "unet_only.bin"
    torch.save({k.removeprefix("model."): v for k, v in sd.items()}, path)
    _assert_same_weights(load_checkpoint(path), sd)


def test_garbage_and_foreign_files_are_refused_with_the_path(tmp_path: Path) -> None:
    garbage = tmp_path / "garbage.bin"
    garbage.write_bytes(b"not a checkpoint at all")
    with pytest.raises(CheckpointError, match="garbage.bin"):
        load_checkpoint(garbage)
    foreign = tmp_path / "resnet.pt"
    torch.save({"fc.weight": torch.zeros(2, 2)}, foreign)
    with pytest.raises(CheckpointError, match="resnet.pt"):
        load_checkpoint(foreign)
    with pytest.raises(CheckpointError, match="nothing_here"):
        load_checkpoint(tmp_path / "nothing_here.pt")


# ---------------------------------------------------------------------------------------------------------------
# Pickles: EDM's network pickles load without running their embedded code; malicious ones are refused.


def test_edm_network_pickle_loads_without_running_embedded_code(
    tmp_path: Path, edm_reference: dict, sd: dict, edm_modules
) -> None:
    reconstruct, easy_dict = edm_modules
    marker = tmp_path / "MARKER"
    config = dict(edm_reference["config"])
    net = EDMPrecond(**config)
    net.load_state_dict(sd)
    net.model.enc["16x16_block0"].register_buffer("scratch", torch.ones(3), persistent=False)
    payload = dict(
        ema=edm_style(net, reconstruct, marker, init_kwargs=easy_dict(config)),
        loss_fn=edm_style(torch.nn.Identity(), reconstruct, marker, None),
        augment_pipe=None,
        dataset_kwargs=easy_dict(path="imagenet-64x64.zip", xflip=False),
    )
    path = tmp_path / "edm-imagenet-64x64-cond-adm.pkl"
    with path.open("wb") as fh:
        pickle.dump(payload, fh)

    model = load_checkpoint(path)
    assert not marker.exists()
    _assert_same_weights(model, sd)
    assert model.config["model_channels"] == config["model_channels"]
    _assert_reproduces_fixture(model, edm_reference)

    # Control: the file really does run its embedded code under a plain unpickler.
    with path.open("rb") as fh:
        pickle.load(fh)
    assert marker.read_text() == "embedded code ran"


def test_edm_pickle_init_kwargs_take_precedence_over_inference(
    tmp_path: Path, edm_reference: dict, sd: dict, edm_modules
) -> None:
    reconstruct, _ = edm_modules
    config = {**edm_reference["config"], "dropout": 0.1, "use_fp16": True, "attn_resolutions": [16, 4]}
    net = EDMPrecond(**config)
    net.load_state_dict(sd)
    path = tmp_path / "network-snapshot-000100.pkl"
    with path.open("wb") as fh:
        pickle.dump({"ema": edm_style(net, reconstruct, tmp_path / "m", init_kwargs=config)}, fh)
    model = load_checkpoint(path)
    assert model.config["dropout"] == 0.1 and model.config["use_fp16"] is True
    assert model.config["attn_resolutions"] == [16, 4]
    assert not (tmp_path / "m").exists()


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.mark.parametrize("name", ["evil.pkl", "evil.pt", "evil.bin"])
def test_malicious_pickle_is_refused_without_running(tmp_path: Path, sd: dict, name: str) -> None:
    marker = tmp_path / "PWNED"
    path = tmp_path / name
    payload = {"ema": _Evil(marker), "state_dict": sd}
    if name.endswith(".pkl"):
        with path.open("wb") as fh:
            pickle.dump(payload, fh)
    else:
        torch.save(payload, path)
    with pytest.raises(UnsafeCheckpointError, match=name) as info:
        load_checkpoint(path)
    assert isinstance(info.value, CheckpointError)
    assert not marker.exists()
    if not name.endswith(".pkl"):  # torch's reader: the class it met is named; its advice to run the code is not
        assert "it holds an object of posix.system" in str(info.value) and "\x1b" not in str(info.value), str(info.value)
        assert "weights_only` set to `False" not in str(info.value)


# ---------------------------------------------------------------------------------------------------------------
# Config inference and mismatches.

INFERENCE_CONFIGS = [
    dict(img_resolution=64, img_channels=3, label_dim=1000, model_channels=192, channel_mult=[1, 2, 3, 4],
         channel_mult_emb=4, num_blocks=3, attn_resolutions=[32, 16, 8], augment_dim=0),
    dict(img_resolution=32, img_channels=3, label_dim=0, model_channels=64, channel_mult=[2, 2],
         channel_mult_emb=2, num_blocks=1, attn_resolutions=[], augment_dim=9),
    dict(img_resolution=16, img_channels=1, label_dim=10, model_channels=64, channel_mult=[1, 3, 2],
         channel_mult_emb=4, num_blocks=0, attn_resolutions=[16], augment_dim=0),
    dict(img_resolution=128, img_channels=4, label_dim=5, model_channels=32, channel_mult=[1, 2, 4, 4, 8],
         channel_mult_emb=3, num_blocks=2, attn_resolutions=[32, 8], augment_dim=0),
]  # fmt: skip


@pytest.mark.parametrize("cfg", INFERENCE_CONFIGS, ids=lambda c: f"{c['img_resolution']}-{c['channel_mult']}")
def test_config_inference_round_trips(cfg: dict) -> None:
    with torch.device("meta"):
        model = EDMPrecond(**cfg)
    inferred = infer_config(model.state_dict())
    assert _arch(inferred) == _arch(cfg)
    with torch.device("meta"):
        rebuilt = EDMPrecond(**inferred)
    assert {k: v.shape for k, v in rebuilt.state_dict().items()} == {k: v.shape for k, v in model.state_dict().items()}


def test_config_inference_drops_attention_at_narrow_widths() -> None:
    with torch.device("meta"):
        model = EDMPrecond(img_resolution=32, img_channels=3, model_channels=32, channel_mult=[1, 2],
                           num_blocks=1, attn_resolutions=[32, 16])  # fmt: skip
    assert infer_config(model.state_dict())["attn_resolutions"] == [16]


def test_given_config_that_does_not_fit_names_keys(tmp_path: Path, edm_reference: dict, sd: dict) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    wrong = {**edm_reference["config"], "model_channels": 64}
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(path, config=wrong)
    message = str(info.value)
    assert str(path) in message
    assert "mis-shaped" in message and "model.map_layer0.weight (128, 32) vs model (256, 64)" in message

    extra = dict(sd) | {"model.extra.weight": torch.zeros(1)}
    trimmed = {k: v for k, v in extra.items() if k != "model.out_conv.bias"}
    torch.save(trimmed, path)
    with pytest.raises(CheckpointMismatchError) as info:
        load_checkpoint(path, config=edm_reference["config"])
    message = str(info.value)
    assert "1 missing: model.out_conv.bias" in message
    assert "1 unexpected: model.extra.weight" in message


def test_given_config_is_used(tmp_path: Path, edm_reference: dict, sd: dict) -> None:
    path = tmp_path / "pytorch_model.bin"
    torch.save(sd, path)
    model = load_checkpoint(path, config={**edm_reference["config"], "sigma_data": 0.5, "dropout": 0.25})
    assert model.config["dropout"] == 0.25
    _assert_same_weights(model, sd)


# ---------------------------------------------------------------------------------------------------------------
# Registry: specs and loaded checkpoints.


def test_model_spec_validation_and_pickling(tmp_path: Path) -> None:
    with pytest.raises(ValueError):
        ModelSpec()
    with pytest.raises(ValueError):
        ModelSpec(preset="tiny-random", checkpoint="x.bin")
    with pytest.raises(KeyError, match="tiny-random"):
        ModelSpec(preset="no-such-preset")
    spec = ModelSpec(checkpoint=tmp_path / "a.bin")
    assert spec.checkpoint == str(tmp_path / "a.bin")
    assert pickle.loads(pickle.dumps(spec)) == spec
    assert len(pickle.dumps(ModelSpec(preset="tiny-random"))) < 200


def test_load_model_from_checkpoint(tmp_path: Path, edm_reference: dict, sd: dict) -> None:
    folder = tmp_path / "checkpoint_model_001000"
    folder.mkdir()
    torch.save(sd, folder / "pytorch_model.bin")
    torch.save({"real_unet.x": torch.zeros(1)}, folder / "pytorch_model_1.bin")
    spec = ModelSpec(checkpoint=str(folder))
    loaded = load_model(spec)
    assert loaded.trained is True
    assert loaded.name == str(folder)
    assert loaded.sha256 == hashlib.sha256((folder / "pytorch_model.bin").read_bytes()).hexdigest()
    assert loaded.resolution == 32 and loaded.label_dim == 1000
    assert not loaded.module.training
    assert not any(p.requires_grad for p in loaded.module.parameters())
    _assert_reproduces_fixture(loaded.module, edm_reference)
    assert cached_model(spec) is cached_model(spec, "cpu")


def test_torch_zip_named_pkl_goes_through_weights_only_load(tmp_path: Path, sd: dict) -> None:
    path = tmp_path / "generator.pkl"
    torch.save({"ema": sd}, path)
    _assert_same_weights(load_checkpoint(path), sd)


def test_a_checkpoint_rewritten_at_its_path_is_read_anew(tmp_path: Path, sd: dict) -> None:
    """Training saves `latest.pt` again and again: a notebook's next call uses the new weights (the model cache
    knows the file, not only its name), and a task of a run begun with the old weights refuses the new ones."""
    from extractor.forward import ForwardSettings, PreparedForward
    from schemas.store_identity import InputChangedError

    path = tmp_path / "latest.pt"
    torch.save(sd, path)
    spec = ModelSpec(checkpoint=str(path))
    first = cached_model(spec)
    assert cached_model(spec) is first
    with PreparedForward(ForwardSettings(model=spec, layers=("midblock",)), "cpu", first.resolution, batch_size=2) as forward:
        plan = forward.plan()
    assert plan.model_sha256 == first.sha256
    trained_more = {key: value + 1 if value.is_floating_point() else value for key, value in sd.items()}
    torch.save(trained_more, path)
    os.utime(path, ns=(path.stat().st_atime_ns, path.stat().st_mtime_ns + 10**9))  # a later save, whatever the clock's grain
    second = cached_model(spec)
    assert second is not first and second.sha256 == hashlib.sha256(path.read_bytes()).hexdigest() != first.sha256
    key = next(k for k, v in sd.items() if v.is_floating_point())
    assert torch.equal(second.module.state_dict()[key], sd[key] + 1)
    with pytest.raises(InputChangedError, match=r"latest\.pt: the checkpoint changed since this run started"):
        PreparedForward.for_plan(plan)


@pytest.mark.parametrize("dtype", [torch.int32, torch.complex64])
def test_weights_that_are_not_floating_point_are_refused(tmp_path: Path, sd: dict, dtype: torch.dtype) -> None:
    """Loading would cast them without a word (rounded integers, complex values less their imaginary part)."""
    key = next(k for k, v in sd.items() if v.is_floating_point())
    path = tmp_path / "odd.pt"
    torch.save({**sd, key: sd[key].to(dtype)}, path)
    with pytest.raises(CheckpointMismatchError, match=rf"odd\.pt: .*1 not floating-point: {re.escape(key)} {re.escape(str(dtype))}"):
        load_checkpoint(path)
    torch.save({k: v.half() if v.is_floating_point() else v for k, v in sd.items()}, path)  # float16 weights are weights
    _assert_same_weights(load_checkpoint(path), {k: v.half().float() if v.is_floating_point() else v for k, v in sd.items()})
