"""`imzarr convert npz|jpeg …` and `imzarr sample DIR` (also `python -m converter …`)."""

from __future__ import annotations

import argparse
import sys

from converter.convert import ConvertOptions, ConvertResult, convert
from schemas.image_layout import DEFAULT_INNER, DEFAULT_SHARD
from converter.sample import write_sample_shards
from schemas.cli_support import run_cli

PROG = "imzarr convert"


def _common_output_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("-o", "--output", required=True, help="output store: a path or an fsspec URL (e.g. s3://bucket/x.zarr)")
    p.add_argument("--shuffle-seed", type=int, default=None, help="write samples in this seeded random order, so any prefix of the store is a uniform random sample (global_index keeps source positions)")
    p.add_argument("--shard-size", type=int, default=DEFAULT_SHARD, help=f"samples per shard file and per write task (default {DEFAULT_SHARD})")
    p.add_argument("--inner-chunk", type=int, default=DEFAULT_INNER, help=f"samples per inner chunk, the unit zarr reads (default {DEFAULT_INNER})")
    p.add_argument("--workers", type=int, default=None, help="parallel tasks (default: all cores)")
    p.add_argument("--processes", action="store_true", help="decode/inflate in worker processes instead of threads (threads are faster here: Pillow and zlib release the GIL)")
    p.add_argument("--overwrite", action="store_true", help="replace an imzarr store made with other inputs or options")
    p.add_argument("--scratch-dir", default=None, help="where compressed inputs are inflated/decoded before writing (default: beside the output)")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imzarr", description="Convert ImageNet into one chunked Zarr v3 image store (imzarr.images/1).")
    sub = parser.add_subparsers(dest="command", required=True)
    npz = sub.add_parser(
        "npz",
        help="downsampled-ImageNet .npz shards (or ADM sample files) → image store",
        description=(
            "Convert downsampled-ImageNet shards (train_data_batch_*.npz or val_data.npz; data uint8 (N, 3·S·S), "
            "labels 1..1000 in the devkit's map_clsloc order) or ADM/guided-diffusion sample files (arr_0 NHWC, "
            "arr_1 sorted labels) into one store. Labels are remapped to the sorted-WNID order models use. "
            "Re-running the same command resumes an interrupted conversion, and does nothing on a finished one."
        ),
    )
    npz.add_argument("sources", nargs="+", help="shard files and/or folders holding them (ordered naturally: _2 before _10)")
    npz.add_argument("--label-order", choices=["downsampled", "sorted"], default=None, help="order of the labels in the files (default: downsampled for data/labels shards, sorted for arr_0/arr_1 files)")
    npz.add_argument("--allow-pickle", action="store_true", help="also read legacy extension-less pickled batches (pickles can run code: only for files you trust)")
    _common_output_args(npz)

    jpeg = sub.add_parser("jpeg", help="ImageNet JPEG tree (train or val layout) → image store", description="Convert a JPEG class-folder tree or a flat val folder, resized by a model's own recipe.")
    jpeg.add_argument("root", help="tree root: <wnid>/*.JPEG folders, the Kaggle ILSVRC/ tree, or a flat val folder")
    jpeg.add_argument("--recipe", default=None, help="resize recipe: edm-center-crop (default), adm-center-crop or box")
    jpeg.add_argument("--size", type=int, default=64, help="output resolution S (default 64)")
    jpeg.add_argument("--val-labels", default=None, help="labels of a flat val folder: ILSVRC2012_validation_ground_truth.txt or LOC_val_solution.csv")
    jpeg.add_argument("--label-from-folders", action="store_true", help="number sorted folder names that are not WNIDs 0..K-1 (recorded in attrs)")
    jpeg.add_argument("--strict", action="store_true", help="exit non-zero if any file was rejected")
    jpeg.add_argument("--fast-draft", action="store_true", help="let libjpeg decode at reduced size first (faster, not pixel-exact: see README)")
    _common_output_args(jpeg)

    sample = sub.add_parser("sample", help="write the embedded sample shards (procedural 64×64 images, ~10 classes)")
    sample.add_argument("directory", help="folder to write train/ and val/ shards into")
    sample.add_argument("--per-shard", type=int, default=1000)
    sample.add_argument("--train-shards", type=int, default=3)
    sample.add_argument("--val-size", type=int, default=500)
    return parser


def _options(args: argparse.Namespace) -> ConvertOptions:
    return ConvertOptions(
        output=args.output,
        shuffle_seed=args.shuffle_seed,
        shard_size=args.shard_size,
        inner_chunk=args.inner_chunk,
        overwrite=args.overwrite,
        workers=args.workers,
        scratch_dir=args.scratch_dir,
        processes=args.processes,
    )


def _report(result: ConvertResult, strict: bool = False) -> int:
    if result.already_complete:
        print(f"{result.url}: already complete ({result.num_samples} samples) with these inputs and options; nothing to do")
        return 0
    for path, reason in result.rejected:
        print(f"rejected: {path}: {reason}", file=sys.stderr)
    rate = result.num_samples / max(result.seconds, 1e-9)
    ignored = f", {result.ignored} non-image files ignored" if result.ignored else ""
    print(f"{result.url}: {result.num_samples} converted, {len(result.rejected)} rejected{ignored} in {result.seconds:.1f} s ({rate:,.0f} images/s)")
    return 1 if strict and result.rejected else 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)

    def body() -> int:
        if args.command == "sample":
            for path in write_sample_shards(args.directory, args.per_shard, args.train_shards, args.val_size):
                print(path)
            return 0
        if args.command == "npz":
            from converter.sources.npz import open_npz_source

            source = open_npz_source(args.sources, args.label_order, args.allow_pickle)
            return _report(convert(source, _options(args)))
        from converter.sources.jpeg import open_jpeg_source

        source = open_jpeg_source(args.root, args.recipe, args.size, args.val_labels, args.label_from_folders, args.fast_draft)
        return _report(convert(source, _options(args)), strict=args.strict)

    return run_cli(PROG, body)
