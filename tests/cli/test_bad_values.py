"""Bad values are one line naming the value, exit 2 (1 for a server that cannot be reached), never "unexpected",
and nothing is created; the Python API raises the same class with the same message. The command line runs in this
process (`schemas.cli.dispatch.main`), so each case costs milliseconds, not an interpreter and torch per case;
only the full disk needs a child process (a file size limit)."""

from __future__ import annotations

import copy
import resource
import signal
import subprocess
import sys
from pathlib import Path

import fsspec.config
import numpy as np
import pytest
import zarr

from converter.api import convert_npz
from converter.sample import write_sample_shards
from converter.sources.base import SourceError
from extractor.api import extract, features, generate_options
from extractor.forward import ExtractionError
from extractor.image_dataset import ImageStoreDataset
from extractor.models.checkpoints import CheckpointError, read_checkpoint
from extractor.selection import RepeatedEntryError, SelectionError
from schemas.cli.dispatch import main as imzarr
from schemas.api import StorageOptionsError, apply_storage_options, parse_storage_options
from schemas.remote_storage import RemoteStorageError
from schemas.task_runner import SchedulerError, SchedulerUnreachableError

NUM_SAMPLES = 40


@pytest.fixture(scope="module")
def work(tmp_path_factory) -> Path:
    """An image store of 40 samples, and hostile inputs: random bytes as a checkpoint, an index file with a
    repeat, an NPZ shard whose `data` is a pickled object array."""
    work = tmp_path_factory.mktemp("values")
    write_sample_shards(str(work / "src"), NUM_SAMPLES, 1, 4)
    convert_npz(str(work / "src" / "train"), str(work / "images.zarr"))
    (work / "random.pt").write_bytes(np.random.default_rng(0).bytes(4096))
    (work / "repeated.txt").write_text("3\n7\n3\n")
    rows = np.empty(2, dtype=object)
    rows[:] = [np.zeros(3 * 64 * 64, np.uint8), np.zeros(3 * 64 * 64, np.uint8)]
    (work / "objects").mkdir()
    np.savez(work / "objects" / "train_data_batch_1.npz", data=rows, labels=np.array([1, 2]))
    return work


@pytest.fixture
def in_work(work, monkeypatch):
    """Run in the work folder; fsspec's configuration (which --storage-options changes) restored afterwards."""
    monkeypatch.chdir(work)
    saved = copy.deepcopy(fsspec.config.conf)
    yield work
    fsspec.config.conf.clear()
    fsspec.config.conf.update(saved)


def _files(root: Path) -> set[str]:
    return {str(p.relative_to(root)) for p in root.rglob("*")}


def _one_line(argv: list[str], capsys, root: Path) -> tuple[int, str]:
    """Exit code and the one error line of `imzarr ARGV`, asserting that it created nothing under `root`."""
    before = _files(root)
    code = imzarr(argv)
    err = capsys.readouterr().err
    lines = [line for line in err.splitlines() if line.strip()]
    assert len(lines) == 1, err
    assert "unexpected" not in lines[0] and "Traceback" not in err, err
    assert _files(root) == before, f"created {sorted(_files(root) - before)}"
    return code, lines[0]


EXTRACT = ["extract", "images.zarr", "-o", "acts.zarr", "--preset", "tiny-random", "--layers", "midblock", "--device", "cpu"]
KEYWORDS = dict(preset="tiny-random", layers="midblock", device="cpu")


def _extract_api(**changed):
    return lambda: extract("images.zarr", "acts.zarr", **{**KEYWORDS, **changed})


# (case, extra argv, exit code, the API call that must raise the same, its class, text the line must hold)
CASES = [
    ("classes empty", ["--classes", ""], 2, _extract_api(classes=""), SelectionError, "--classes '': names nothing"),
    ("classes only a comma", ["--classes", ","], 2, _extract_api(classes=","), SelectionError, "--classes ',': names nothing"),
    ("classes with an empty entry", ["--classes", "tench,,goldfish"], 2, _extract_api(classes="tench,,goldfish"), SelectionError, "entry 2 is empty"),
    ("class given twice", ["--classes", "tench,Tench"], 2, _extract_api(classes="tench,Tench"), RepeatedEntryError, "'Tench' is given twice"),
    ("one class two ways", ["--classes", "tench,0"], 2, _extract_api(classes="tench,0"), RepeatedEntryError, "'tench' and '0' both name n01440764"),
    ("layer given twice", ["--layers", "midblock,midblock"], 2, _extract_api(layers="midblock,midblock"), RepeatedEntryError, "'midblock' is given twice"),
    ("index given twice", ["--indices", "repeated.txt"], 2, _extract_api(indices="repeated.txt"), RepeatedEntryError, "repeated.txt: position 3 is listed 2 times"),
    ("more samples than the store", ["--num-samples", "1000000"], 2, _extract_api(num_samples=1000000), SelectionError, "--num-samples 1,000,000: the store holds 40 samples"),
    ("sigma too large", ["--sigma", "1e300"], 2, _extract_api(sigma=1e300), ExtractionError, "--sigma 1e+300: σ must be at most 1e+18"),
    ("sigma infinite", ["--sigma", "inf"], 2, _extract_api(sigma=float("inf")), ExtractionError, "--sigma inf"),
    ("device unknown", ["--device", "tpu"], 2, _extract_api(device="tpu"), ExtractionError, "--device 'tpu': choose auto, cpu, cuda or cuda:N"),
    ("scheduler not an address", ["--scheduler", "notaurl"], 2, _extract_api(scheduler="notaurl"), SchedulerError, "--scheduler 'notaurl': not a scheduler address"),
    ("scheduler no one answers", ["--scheduler", "tcp://127.0.0.1:1"], 1, _extract_api(scheduler="tcp://127.0.0.1:1"), SchedulerUnreachableError, "tcp://127.0.0.1:1: cannot reach the dask scheduler"),
    ("checkpoint of random bytes", ["--checkpoint", "random.pt"], 2, None, CheckpointError, "random.pt: not a checkpoint (unrecognised format"),
]


@pytest.mark.parametrize("case, extra, code, api_call, error_class, text", CASES, ids=[c[0] for c in CASES])
def test_extract_refuses_in_one_line_before_any_output(in_work, capsys, case, extra, code, api_call, error_class, text):
    argv = list(EXTRACT)
    if extra[0] in ("--layers", "--checkpoint"):  # replaces the model or the layers given above
        at = argv.index("--preset" if extra[0] == "--checkpoint" else extra[0])
        argv[at : at + 2] = extra
    else:
        argv += extra
    got, line = _one_line(argv, capsys, in_work)
    assert got == code and text in line, line
    if api_call is None:
        api_call = lambda: read_checkpoint("random.pt")  # noqa: E731 - the file is refused before any network exists
    with pytest.raises(error_class) as raised:
        api_call()
    assert line == f"imzarr extract: error: {raised.value}"
    assert not (in_work / "acts.zarr").exists()


GENERATE = ["generate", "-o", "gen.zarr", "--preset", "tiny-random", "--per-class", "1", "--device", "cpu"]


@pytest.mark.parametrize("classes", ["", ",", "tench,n01440764"])
def test_generate_refuses_empty_and_repeated_classes(in_work, capsys, classes):
    code, line = _one_line([*GENERATE, "--classes", classes], capsys, in_work)
    with pytest.raises(SelectionError) as raised:
        generate_options("gen.zarr", preset="tiny-random", per_class=1, classes=classes)
    assert code == 2 and line == f"imzarr generate: error: {raised.value}"


@pytest.mark.parametrize("given", ["0", 0, "tench", "Tench", "n01440764", ["0", "goldfish"]])
def test_generate_takes_indices_names_and_wnids_like_extract(given):
    options = generate_options("gen.zarr", preset="tiny-random", per_class=1, classes=given)
    assert options.classes[0] == "n01440764"
    assert options.classes == (("n01440764", "n01443537") if isinstance(given, list) else ("n01440764",))


def test_dataset_and_features_share_the_parser(work):
    url = str(work / "images.zarr")
    with pytest.raises(SelectionError, match="--classes '': names nothing"):
        ImageStoreDataset(url, classes="")
    with pytest.raises(RepeatedEntryError, match="indices: position 5 is listed 2 times"):
        ImageStoreDataset(url, indices=[5, 1, 5])
    with pytest.raises(SelectionError, match="the store holds 40 samples"):
        ImageStoreDataset(url, num_samples=41)
    assert len(ImageStoreDataset(url, num_samples=40)) == 40
    images = np.zeros((2, 3, 64, 64), np.uint8)
    by_name = features(images, ["tench", "1"], layers="midblock", model="tiny-random", device="cpu", noise_seed=0)
    assert by_name["label"].values.tolist() == [0, 1]
    with pytest.raises(RepeatedEntryError):
        features(images, layers=["midblock", "midblock"], model="tiny-random", device="cpu")


def test_storage_options_of_the_wrong_type_are_one_line(in_work, capsys):
    options = '{"endpoint_url": 5}'
    code, line = _one_line(["convert", "npz", "src/train", "-o", "s3://bucket/x.zarr", "--storage-options", options], capsys, in_work)
    with pytest.raises(StorageOptionsError) as raised:
        parse_storage_options(options)
    assert code == 2 and line == f"imzarr convert: error: {raised.value}" and "endpoint_url: 5 is not an http" in line
    with pytest.raises(StorageOptionsError, match="config_kwargs.read_timeout"):
        parse_storage_options('{"config_kwargs": {"read_timeout": "soon"}}')


def test_storage_option_names_and_protocols_are_checked_before_use(in_work, capsys):
    """A misspelt s3fs option would reach aiobotocore's session, which refuses it as a bare TypeError at the first
    request; a protocol whose package is missing, or unknown, would be an ImportError or ValueError."""
    pytest.importorskip("s3fs")
    options = '{"endpoint_ur": "http://127.0.0.1:9"}'
    code, line = _one_line(["convert", "npz", "src/train", "-o", "s3://bucket/x.zarr", "--storage-options", options], capsys, in_work)
    assert code == 2 and line == "imzarr convert: error: --storage-options endpoint_ur: not an option of s3:// (s3fs); did you mean endpoint_url?", line
    with pytest.raises(StorageOptionsError, match="not an option of s3://"):
        apply_storage_options({"regionname": "x"}, ["s3"])
    apply_storage_options({"endpoint_url": "http://127.0.0.1:9", "client_kwargs": {"region_name": "x"}, "profile": "p", "use_listings_cache": False}, ["s3"])
    code, line = _one_line(["convert", "npz", "nope://bucket/t", "-o", "x.zarr"], capsys, in_work)
    assert code == 2 and line.startswith("imzarr convert: error: nope://: not a protocol fsspec knows"), line


def test_an_unreachable_endpoint_is_one_line_naming_it(in_work, capsys, monkeypatch):
    pytest.importorskip("s3fs")
    for name, value in {"AWS_ACCESS_KEY_ID": "testing", "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1"}.items():
        monkeypatch.setenv(name, value)
    endpoint = "http://127.0.0.1:1"
    options = f'{{"endpoint_url": "{endpoint}"}}'
    code, line = _one_line(["convert", "npz", "src/train", "-o", "s3://bucket/x.zarr", "--storage-options", options], capsys, in_work)
    assert code == 1 and line.startswith(f"imzarr convert: error: {endpoint}/") and "cannot reach" in line, line
    assert "--storage-options" in line  # where the endpoint is set
    with pytest.raises(RemoteStorageError) as raised:
        convert_npz("src/train", "s3://bucket/x.zarr")  # the CLI left its options in fsspec's configuration
    assert line == f"imzarr convert: error: {raised.value}"


def test_an_input_store_without_credentials_or_endpoint_says_what_to_set(in_work, capsys, monkeypatch):
    pytest.importorskip("s3fs")
    for name in ("AWS_ACCESS_KEY_ID", "AWS_SECRET_ACCESS_KEY", "AWS_PROFILE", "FSSPEC_S3_ENDPOINT_URL"):
        monkeypatch.delenv(name, raising=False)
    monkeypatch.setenv("AWS_SHARED_CREDENTIALS_FILE", str(in_work / "no-credentials"))
    monkeypatch.setenv("AWS_CONFIG_FILE", str(in_work / "no-config"))
    monkeypatch.setenv("AWS_EC2_METADATA_DISABLED", "true")
    code, line = _one_line(["info", "s3://bucket/images.zarr"], capsys, in_work)
    assert code == 2 and line.startswith("imzarr info: error: s3://bucket/images.zarr: no credentials"), line
    assert "--storage-options" in line and "not a Zarr group" not in line


def test_npz_of_a_pickled_object_array_says_so(in_work, capsys):
    code, line = _one_line(["convert", "npz", "objects", "-o", "out.zarr"], capsys, in_work)
    with pytest.raises(SourceError) as raised:
        convert_npz("objects", "out.zarr")
    assert code == 2 and line == f"imzarr convert: error: {raised.value}"
    assert line.endswith("objects/train_data_batch_1.npz: data is a pickled object array (dtype object), which can run code when loaded; pass --allow-pickle if you trust it")
    assert not (in_work / "out.zarr").exists()


def test_npz_of_a_pickled_object_array_converts_with_allow_pickle(work, tmp_path):
    """Opted in, the rows of the object array convert exactly as the same rows saved as one uint8 array."""
    rows = np.random.default_rng(1).integers(0, 256, (3, 3 * 64 * 64), dtype=np.uint8)
    pickled, plain = tmp_path / "pickled", tmp_path / "plain"
    one_per_row = np.empty(3, dtype=object)
    one_per_row[:] = list(rows)
    for folder, data in ((pickled, one_per_row), (tmp_path / "elementwise", rows.astype(object)), (plain, rows)):
        folder.mkdir()
        np.savez(folder / "train_data_batch_1.npz", data=data, labels=np.array([1, 2, 3]))
    convert_npz(str(plain), str(tmp_path / "plain.zarr"))
    a = zarr.open_group(str(tmp_path / "plain.zarr"), mode="r")
    np.testing.assert_array_equal(a["image"][:].reshape(3, -1), rows)
    for name in ("pickled", "elementwise"):
        convert_npz(str(tmp_path / name), str(tmp_path / f"{name}.zarr"), allow_pickle=True)
        b = zarr.open_group(str(tmp_path / f"{name}.zarr"), mode="r")
        for array in ("image", "label", "global_index"):
            np.testing.assert_array_equal(a[array][:], b[array][:], err_msg=f"{name}: {array}")


def _file_size_limit(limit: int):
    def apply() -> None:
        signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit then fails with EFBIG, as on a full disk
        resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit))

    return apply


def test_full_disk_during_extract_names_the_store(work, tmp_path):
    """The store's metadata fits under the limit; the first activation shard does not (as a disk filling up)."""
    output = tmp_path / "acts.zarr"
    argv = [sys.executable, "-m", "schemas", *EXTRACT[:3], str(output), *EXTRACT[4:], "--shard-size", "40"]
    proc = subprocess.run(argv, cwd=work, capture_output=True, text=True, preexec_fn=_file_size_limit(48 << 10))
    errors = [line for line in proc.stderr.splitlines() if ": error:" in line]
    assert proc.returncode == 1 and len(errors) == 1, proc.stderr[-2000:]
    assert errors[0].startswith(f"imzarr extract: error: {output}") and "cannot write (File too large)" in errors[0], errors[0]


@pytest.mark.parametrize("address, code, error_class", [("notaurl", 2, SchedulerError), ("tcp://127.0.0.1:1", 1, SchedulerUnreachableError)])
def test_convert_with_a_bad_scheduler_creates_nothing(in_work, capsys, address, code, error_class):
    got, line = _one_line(["convert", "npz", "src/train", "-o", "out.zarr", "--scheduler", address], capsys, in_work)
    before = _files(in_work)
    with pytest.raises(error_class) as raised:
        convert_npz("src/train", "out.zarr", scheduler=address)
    assert got == code and line == f"imzarr convert: error: {raised.value}" and address in line
    assert _files(in_work) == before  # no store, no scratch folder
