"""`imzarr convert npz|jpeg …` and `imzarr sample DIR`; `python -m converter npz|jpeg …` is `imzarr convert …`."""

from __future__ import annotations

import argparse
import sys

from converter import api
from schemas.cli import CommandParser, HelpFormatter, add_command, builder_keywords, dispatch, non_negative_int, positive_int, resumed_note


def add_commands(sub) -> None:
    """`convert` (with `npz` and `jpeg`) and `sample`, for the `imzarr` tree."""
    convert = sub.add_parser(
        "convert",
        help="NPZ shards or a JPEG tree → image store",
        description="Convert ImageNet into one chunked Zarr v3 image store (imzarr.images/1). `imzarr convert npz --help` and `imzarr convert jpeg --help` explain each source.",
        formatter_class=HelpFormatter,
    )
    add_convert_commands(convert.add_subparsers(dest="source", metavar="SOURCE", required=True))
    sample = add_command(
        sub,
        "sample",
        "write the embedded sample shards",
        "Write a small sample in the real downsampled-ImageNet shard format: procedurally drawn 64×64 images over "
        "10 classes, as train shards (with `mean`) and a deflated val_data.npz. `make convert` uses it.",
    )
    sample.add_argument("directory", help="folder to write train/ and val/ shards into (made if missing)")
    sample.add_argument("--per-shard", type=positive_int, default=1000, help="images per train shard")
    sample.add_argument("--train-shards", type=positive_int, default=3, help="number of train shards")
    sample.add_argument("--val-size", type=positive_int, default=500, help="images in val_data.npz")
    sample.set_defaults(handler=_sample)


def add_convert_commands(sub) -> None:
    """`npz` and `jpeg`: under `imzarr convert`, or at the top of `python -m converter`."""
    npz = add_command(
        sub,
        "npz",
        "downsampled-ImageNet .npz shards (or ADM sample files) → image store",
        "Convert downsampled-ImageNet shards (train_data_batch_*.npz or val_data.npz; data uint8 (N, 3·S·S), "
        "labels 1..1000 in the devkit's map_clsloc order) or ADM/guided-diffusion sample files (arr_0 NHWC, "
        "arr_1 sorted labels) into one store. Labels are remapped to the sorted-WNID order models use. "
        "Re-running the same command resumes an interrupted conversion, and does nothing on a finished one.",
        prog_name="imzarr convert",
        outputs=("output",),
    )
    npz.add_argument("sources", nargs="+", help="shard files and/or folders holding them, paths or URLs such as s3://bucket/train/ (ordered naturally: _2 before _10, also when named one by one; folders in the order given)")
    npz.add_argument("--label-order", choices=api.LABEL_ORDERS, default=None, help="order of the labels in the files (default: downsampled for data/labels shards, sorted for arr_0/arr_1 files)")
    npz.add_argument("--allow-pickle", action="store_true", help="also read legacy extension-less pickled batches and .npz images saved as pickled object arrays (pickles can run code: only for files you trust)")
    _output_args(npz)
    npz.set_defaults(handler=_convert_npz)

    jpeg = add_command(
        sub,
        "jpeg",
        "ImageNet JPEG tree (train or val layout) → image store",
        "Convert a JPEG class-folder tree or a flat val folder, resized by a model's own recipe. Files are opened "
        "by content (CMYK, grayscale and PNG-in-.JPEG are converted to RGB); unreadable files are rejected one by "
        "one and listed.",
        prog_name="imzarr convert",
        outputs=("output",),
    )
    jpeg.add_argument("root", help="tree root, a path or a URL such as s3://bucket/train/: <wnid>/*.JPEG folders, the Kaggle ILSVRC/ tree, or a flat val folder")
    jpeg.add_argument("--recipe", default=None, help="resize recipe: edm-center-crop (default), adm-center-crop or box")
    jpeg.add_argument("--size", type=positive_int, default=64, help="output resolution S")
    jpeg.add_argument("--val-labels", default=None, help="labels of a flat val folder: ILSVRC2012_validation_ground_truth.txt or LOC_val_solution.csv (default: none; trees take labels from folder names)")
    jpeg.add_argument("--label-from-folders", action="store_true", help="label the sorted class folders 0..K-1, WNID-named or not, for trees of classes other than ImageNet's (recorded in attrs; these labels are not ImageNet classes, so extract with a network of the 1000 ImageNet classes then needs --class-free)")
    jpeg.add_argument("--strict", action="store_true", help="exit 1 if any file was rejected")
    jpeg.add_argument("--fast-draft", action="store_true", help="let libjpeg decode JPEGs at a reduced DCT scale first (at least twice --size on the short side): faster, not pixel-exact; README \"JPEG trees\"")
    _output_args(jpeg)
    jpeg.set_defaults(handler=_convert_jpeg)


def _output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output store: a path or an fsspec URL (e.g. s3://bucket/x.zarr); never inside or around an input")
    p.add_argument("--shuffle-seed", type=non_negative_int, default=None, help="write samples in this seeded random order, so any prefix of the store is a uniform random sample (global_index keeps source positions); default: source order")
    p.add_argument("--shard-size", type=positive_int, default=api.DEFAULT_SHARD, help="samples per shard file and per write task")
    p.add_argument("--inner-chunk", type=positive_int, default=None, help="samples per inner chunk, the unit zarr reads and xarray's default dask chunk (default: auto, the largest power of two of images within 8 MiB, capped at the shard: 512 for 64×64)")
    p.add_argument("--workers", type=positive_int, default=None, help="parallel tasks (default: all cores)")
    p.add_argument("--scheduler", default=None, help="tcp://host:port of a running dask.distributed scheduler: its workers read the sources and write the shards (--scratch-dir must then be a folder every worker sees; default: this machine)")
    p.add_argument("--processes", action="store_true", help="decode/inflate in worker processes instead of threads (threads are faster here: Pillow and zlib release the GIL)")
    p.add_argument("--overwrite", action="store_true", help="replace an image store made with other inputs or options (never a store of another kind, never anything else)")
    p.add_argument("--scratch-dir", default=None, help="where compressed inputs are inflated/decoded before writing (default: beside the output)")


def _convert_npz(args: argparse.Namespace) -> int:
    return _report(api.convert_npz(**builder_keywords(args, api.convert_npz)))


def _convert_jpeg(args: argparse.Namespace) -> int:
    try:
        return _report(api.convert_jpeg(**builder_keywords(args, api.convert_jpeg)))
    except api.RejectedFilesError as failed:
        _report(failed.result)  # what the run did, then the error line
        raise


def _sample(args: argparse.Namespace) -> int:
    for path in api.write_sample_shards(args.directory, args.per_shard, args.train_shards, args.val_size):
        print(path)
    return 0


def _report(result) -> int:
    if result.already_complete:
        print(f"{result.url}: already complete ({result.num_samples} samples) with these inputs and options; nothing to do")
    else:
        for path, reason in result.rejected:
            print(f"rejected: {path}: {reason}", file=sys.stderr)
        now = result.num_samples - result.written_before
        rate = now / max(result.seconds, 1e-9)
        ignored = f", {result.ignored} non-image files and hidden folders ignored (listed in attrs)" if result.ignored else ""
        print(f"{result.url}: {result.num_samples} converted{resumed_note(result.num_samples, result.written_before)}, {len(result.rejected)} rejected{ignored} in {result.seconds:.1f} s ({rate:,.0f} images/s)")
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m converter npz|jpeg …` (the same as `imzarr convert npz|jpeg …`)."""
    parser = CommandParser(prog="python -m converter", description="Convert ImageNet into one Zarr v3 image store.", formatter_class=HelpFormatter)
    add_convert_commands(parser.add_subparsers(dest="source", metavar="SOURCE", required=True))
    return dispatch(parser, list(sys.argv[1:] if argv is None else argv))
