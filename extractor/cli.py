"""`imzarr extract|layers|generate|compare|show` (also `python -m extractor …`)."""

from __future__ import annotations

import argparse
import sys

from extractor.models import PRESETS, CheckpointError, InvalidSigmaError, ModelSpec, UnknownLayerError
from extractor.models.registry import UnknownPresetError
from schemas.cli_support import run_cli

# Errors of the model package are plain ValueErrors/KeyErrors (it is usable without imzarr); here they are user errors.
MODEL_ERRORS = (CheckpointError, InvalidSigmaError, UnknownLayerError, UnknownPresetError)


def _model_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", help="DMD2 pytorch_model.bin / model.safetensors (or their folder), a .pt/.pth state dict, or an EDM network .pkl (read without running its code)")
    group.add_argument("--preset", choices=sorted(PRESETS), help="a built-in architecture with seeded random weights (UNTRAINED: for demos and tests)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--compute-dtype", default="fp32", choices=["fp32", "bf16", "fp16"], help="network precision (bf16/fp16 autocast is for CUDA; default fp32)")
    p.add_argument("--batch-size", type=int, default=64, help="samples per forward pass (values do not depend on it)")


def _model_spec(args: argparse.Namespace) -> ModelSpec:
    return ModelSpec(preset=args.preset) if args.preset else ModelSpec(checkpoint=args.checkpoint)


def _scheduler_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=None, help="tcp://host:port of a running dask.distributed scheduler (default: local threads); see README")
    p.add_argument("--resources", default=None, help="resources each task needs on a distributed worker, e.g. GPU=1")
    p.add_argument("--workers", type=int, default=2, help="local threads: one computes while another reads or writes (default 2)")
    p.add_argument("--overwrite", action="store_true", help="replace a store made with other settings")


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="imzarr", description="Run image stores through EDM/DMD2 networks.")
    sub = parser.add_subparsers(dest="command", required=True)

    ex = sub.add_parser(
        "extract",
        help="image store → activation store",
        description=(
            "Stream an image store through the network and store named layers' activations, labeled by sample and "
            "class, as a Zarr v3 activation store (imzarr.activations/1). Re-running the same command resumes an "
            "interrupted run; other settings on an existing store are refused unless --overwrite."
        ),
    )
    ex.add_argument("store", help="image store (made by `imzarr convert` or `imzarr generate`)")
    ex.add_argument("-o", "--output", required=True, help="activation store path or fsspec URL")
    ex.add_argument("--layers", required=True, help="comma-separated layer names or aliases (encoder_bottleneck, midblock); `imzarr layers` lists them")
    _model_args(ex)
    ex.add_argument("--sigma", type=float, default=80.0, help="noise level σ the network is conditioned on (default 80, the generator's own)")
    ex.add_argument("--seed", type=int, default=0, help="seed of the per-sample noise (and of --per-class sampling)")
    ex.add_argument("--no-noise", action="store_true", help="feed the clean image (still conditioned on σ)")
    ex.add_argument("--class-free", action="store_true", help="zero class labels instead of the one-hot of each sample's label")
    ex.add_argument("--pool", default="none", choices=["none", "mean", "max"], help="spatial reduction on the device before storing")
    ex.add_argument("--dtype", default="float16", choices=["float16", "float32"], help="storage dtype (default float16)")
    ex.add_argument("--reconstructions", action="store_true", help="also store D(x) as uint8 images (runs the whole network)")
    ex.add_argument("--num-samples", type=int, default=None, help="the first N samples (a uniform random sample if the store was written shuffled)")
    ex.add_argument("--indices", default=None, help="file of store positions (.npy or one integer per line)")
    ex.add_argument("--classes", default=None, help="comma-separated WNIDs to keep")
    ex.add_argument("--per-class", type=int, default=None, help="K samples per class, chosen with --seed")
    ex.add_argument("--shard-size", type=int, default=None, help="samples per output shard/task (default: ~64 MB of the largest layer)")
    ex.add_argument("--dry-run", action="store_true", help="one batch through the hooks, then a table of shapes, sizes and memory; writes nothing")
    _scheduler_args(ex)

    gen = sub.add_parser(
        "generate",
        help="sample the one-step generator into an image store",
        description=(
            "DMD2 one-step sampling: image = D(σ·ε; σ, one-hot(label)), ε seeded per sample from (seed, sample index), "
            "converted to uint8 as DMD2 does. Writes an image store (imzarr.images/1, source_format generated) that "
            "`imzarr extract` reads like real data; with --layers, also the generator's own activations while sampling."
        ),
    )
    gen.add_argument("-o", "--output", required=True, help="generated image store path or fsspec URL")
    _model_args(gen)
    count = gen.add_mutually_exclusive_group(required=True)
    count.add_argument("--per-class", type=int, help="K samples of each class (class-major order)")
    count.add_argument("--num-samples", type=int, help="N samples with classes drawn uniformly (seeded)")
    gen.add_argument("--classes", default=None, help="comma-separated WNIDs (default: all 1000)")
    gen.add_argument("--seed", type=int, default=0, help="noise seed (default 0)")
    gen.add_argument("--sigma", type=float, default=80.0, help="the generator's input σ (default 80)")
    gen.add_argument("--layers", default=None, help="also capture these layers during sampling (needs --activations-out)")
    gen.add_argument("--activations-out", default=None, help="activation store for --layers")
    gen.add_argument("--pool", default="none", choices=["none", "mean", "max"])
    gen.add_argument("--dtype", default="float16", choices=["float16", "float32"])
    gen.add_argument("--shard-size", type=int, default=None, help="samples per shard/task (default 1024 or less)")
    _scheduler_args(gen)

    cmp = sub.add_parser(
        "compare",
        help="compare two activation stores per class",
        description=(
            "Fréchet distance, precision/recall (Kynkäänniemi et al. 2019) and density/coverage (Naeem et al. 2020) "
            "between two activation stores in one layer's feature space, overall and per class; streaming, bounded memory. "
            "A is taken as the real set, B as the generated one."
        ),
    )
    cmp.add_argument("real", help="activation store A (real samples)")
    cmp.add_argument("generated", help="activation store B (generated samples)")
    cmp.add_argument("--layer", required=True, help="layer variable present in both stores")
    cmp.add_argument("--pool", default="mean", choices=["none", "mean", "max"], help="spatial reduction of unpooled layers (default mean)")
    cmp.add_argument("--no-per-class", action="store_true", help="overall metrics only")
    cmp.add_argument("-k", type=int, default=5, help="nearest neighbours for precision/recall/density/coverage (default 5)")
    cmp.add_argument("-o", "--output", default=None, help="write the report (an xarray dataset, per-class table on dim `class`) to this Zarr store")
    cmp.add_argument("--plot", default=None, help="write a PNG: 2-D projection coloured by source, and per-class coverage bars")
    cmp.add_argument("--projection", default="pca", choices=["pca", "umap"], help="projection for --plot (umap needs the optional umap-learn)")

    show = sub.add_parser("show", help="contact sheet of a store's images", description="A grid of images, one row per class, with class names: real, generated or reconstructions.")
    show.add_argument("store", help="image store, or activation store with reconstructions")
    show.add_argument("-o", "--output", default="grid.png", help="PNG to write (default grid.png)")
    show.add_argument("--classes", default=None, help="comma-separated WNIDs (default: the first classes in the store)")
    show.add_argument("--per-class", type=int, default=8, help="images per row (default 8)")
    show.add_argument("--max-classes", type=int, default=10, help="rows when --classes is not given (default 10)")

    layers = sub.add_parser("layers", help="list a network's layers and output shapes", description="List every layer name (module paths and aliases) with its output shape for one sample.")
    _model_args(layers)
    return parser


def _forward_settings(args: argparse.Namespace, noise_seed: int | None, **extra):
    from extractor.extract import ForwardSettings

    return ForwardSettings(
        model=_model_spec(args),
        layers=tuple(x.strip() for x in (args.layers or "").split(",") if x.strip()),
        sigma=args.sigma,
        noise_seed=noise_seed,
        pool=args.pool,
        storage_dtype=args.dtype,
        compute_dtype=args.compute_dtype,
        **extra,
    )


def _print_layers(args: argparse.Namespace) -> int:
    from extractor.models import cached_model, describe_layers, resolve_layer

    loaded = cached_model(_model_spec(args), "cpu")
    if not loaded.trained:
        print(f"note: {loaded.name} is an UNTRAINED preset (seeded random weights)")
    print(f"{'layer':<28} {'module':<26} output shape (per sample)")
    for name, shape in describe_layers(loaded.module):
        print(f"{name:<28} {resolve_layer(loaded.module, name):<26} {tuple(shape[1:])}")
    return 0


def _extract(args: argparse.Namespace) -> int:
    from extractor.extract import ExtractOptions, extract
    from extractor.scheduling import SchedulerSpec, parse_resources
    from extractor.selection import SelectionSpec

    forward = _forward_settings(args, None if args.no_noise else args.seed, class_free=args.class_free, reconstructions=args.reconstructions)
    options = ExtractOptions(
        store=args.store,
        output=args.output,
        forward=forward,
        selection=SelectionSpec(
            num_samples=args.num_samples,
            indices_file=args.indices,
            classes=tuple(args.classes.split(",")) if args.classes else None,
            per_class=args.per_class,
            seed=args.seed,
        ),
        batch_size=args.batch_size,
        device=args.device,
        scheduler=SchedulerSpec(args.scheduler, args.workers, parse_resources(args.resources)),
        overwrite=args.overwrite,
        shard_size=args.shard_size,
    )
    if args.dry_run:
        from extractor.dry_run import dry_run_table

        print(dry_run_table(options))
        return 0
    result = extract(options)
    _print_outcome(result, result.url, "these activations come from an UNTRAINED network (random weights of a preset); pass --checkpoint for real ones")
    return 0


def _print_outcome(result, what: str, untrained_note: str) -> None:
    """One summary line (or "nothing to do"), then a plain warning when the network was not trained."""
    if result.already_complete:
        print(f"{result.url}: already complete ({result.num_samples} samples) with these settings; nothing to do")
    else:
        rate = result.num_samples / max(result.seconds, 1e-9)
        print(f"{what}: {result.num_samples} samples in {result.seconds:.1f} s ({rate:,.1f} images/s)")
    if not result.trained:
        print(f"NOTE: {untrained_note}.")


def _generate(args: argparse.Namespace) -> int:
    from extractor.generate import GenerateOptions, generate
    from extractor.scheduling import SchedulerSpec, parse_resources

    forward = _forward_settings(args, args.seed)
    result = generate(
        GenerateOptions(
            output=args.output,
            forward=forward,
            per_class=args.per_class,
            num_samples=args.num_samples,
            classes=tuple(args.classes.split(",")) if args.classes else None,
            activations_out=args.activations_out,
            batch_size=args.batch_size,
            device=args.device,
            scheduler=SchedulerSpec(args.scheduler, args.workers, parse_resources(args.resources)),
            overwrite=args.overwrite,
            shard_size=args.shard_size,
        )
    )
    what = result.url + (f" and {result.activations_url}" if result.activations_url else "")
    _print_outcome(result, what, "generated by an UNTRAINED network (random weights of a preset): these images are noise-like patterns, not ImageNet samples")
    return 0


def _compare(args: argparse.Namespace) -> int:
    from extractor.compare import compare_stores, format_report_table

    report = compare_stores(
        args.real, args.generated, args.layer, per_class=not args.no_per_class, pool=args.pool, k=args.k,
        output=args.output, plot=args.plot, projection=args.projection,
    )
    print(format_report_table(report))
    for label, path in (("report", args.output), ("plot", args.plot)):
        if path:
            print(f"{label}: {path}")
    return 0


def _show(args: argparse.Namespace) -> int:
    from extractor.contact_sheet import write_contact_sheet

    from schemas.activation_store import RECONSTRUCTION_VAR
    import zarr

    variable = RECONSTRUCTION_VAR if RECONSTRUCTION_VAR in zarr.open_group(args.store, mode="r") else "image"
    path = write_contact_sheet(
        args.store, args.output, classes=args.classes.split(",") if args.classes else None,
        per_class=args.per_class, max_classes=args.max_classes, variable=variable,
    )
    print(path)
    return 0


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    commands = {"extract": _extract, "layers": _print_layers, "generate": _generate, "compare": _compare, "show": _show}
    return run_cli(f"imzarr {args.command}", lambda: commands[args.command](args), user_errors=MODEL_ERRORS)
