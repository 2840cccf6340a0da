"""`imzarr extract|layers|generate|compare|stats|report|show` (also `python -m extractor …`).

Each handler maps its arguments to one entry of extractor/api.py (by name: an option's argparse name is the
entry's keyword) and prints; every default, parse and refusal lives there. Building these parsers imports nothing
heavy (no torch): the API imports what it runs when it runs.
"""

from __future__ import annotations

import argparse
import sys

from extractor import api
from extractor.api import COMPUTE_DTYPE_NAMES, POOL_MODES, PRESET_NAMES, STORAGE_DTYPES
from schemas.cli import CommandParser, HelpFormatter, add_command, builder_keywords, dispatch, non_negative_int, positive_int, resumed_note


def add_commands(sub) -> None:
    """Every extractor command, for the `imzarr` tree (and `python -m extractor`)."""
    _add_extract(sub)
    _add_layers(sub)
    _add_generate(sub)
    _add_compare(sub)
    _add_report(sub)
    _add_stats(sub)
    _add_show(sub)


# --- shared option groups -------------------------------------------------------------------------------------


def _model_args(p: argparse.ArgumentParser) -> None:
    group = p.add_mutually_exclusive_group(required=True)
    group.add_argument("--checkpoint", help="DMD2 pytorch_model.bin / model.safetensors (or their folder), a .pt/.pth state dict, or an EDM network .pkl (read without running its code)")
    group.add_argument("--preset", choices=PRESET_NAMES, help="a built-in architecture with seeded random weights (UNTRAINED: for demos and tests)")
    p.add_argument("--device", default="auto", help="auto (cuda if available), cpu, cuda or cuda:N")
    p.add_argument("--compute-dtype", default="auto", choices=COMPUTE_DTYPE_NAMES, help="network precision: auto is bf16 autocast on CUDA for diffusion networks (tolerance against fp32 checked on a reference fixture: README \"Models\") and fp32 otherwise; bf16/fp16 need CUDA")
    p.add_argument("--batch-size", type=positive_int, default=None, help="samples per forward pass (default: 64 on CPU, chosen from free memory on CUDA; README \"What values depend on\")")


def _run_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--scheduler", default=None, help="tcp://host:port of a running dask.distributed scheduler (default: local threads); README \"Object storage and clusters\"")
    p.add_argument("--resources", default=None, help="resources each task needs on a distributed worker, e.g. GPU=1 (default: none)")
    p.add_argument("--workers", type=positive_int, default=2, help="local threads: one computes while another reads or writes")
    p.add_argument("--overwrite", action="store_true", help="replace a store of the same kind made with other settings (never an input, a store of another kind, or anything else)")
    p.add_argument("--compile", action="store_true", help="torch.compile the network's blocks (CUDA): faster for long runs, after a one-off compile on the first batch (BENCHMARKS.md)")


def _print_outcome(result, what: str, untrained_note: str, notes: tuple[str, ...] = ()) -> None:
    """One summary line (or "nothing to do"), the `notes`, then a plain warning when the network was not trained."""
    if result.already_complete:
        print(f"{result.url}: already complete ({result.num_samples} samples) with these settings; nothing to do")
    else:
        now = result.num_samples - result.written_before
        rate = now / max(result.seconds, 1e-9)
        print(f"{what}: {result.num_samples} samples{resumed_note(result.num_samples, result.written_before)} in {result.seconds:.1f} s ({rate:,.1f} images/s)")
    for note in notes:
        print(f"NOTE: {note}")
    if not result.trained:
        print(f"NOTE: {untrained_note}.")


def _print_site(site) -> None:
    print(f"report site: {site.files:,} files, {site.bytes / 1e6:.1f} MB in {site.seconds:.1f} s")
    print(f"open {site.index}")


# --- extract ----------------------------------------------------------------------------------------------------


def _add_extract(sub) -> None:
    ex = add_command(
        sub,
        "extract",
        "image store → activation store",
        "Stream an image store through the network and store named layers' activations, labeled by sample and "
        "class, as a Zarr v3 activation store (imzarr.activations/1). Re-running the same command resumes an "
        "interrupted run; other settings on an existing store are refused unless --overwrite.",
        outputs=("output",),
    )
    ex.add_argument("store", help="image store (made by `imzarr convert` or `imzarr generate`)")
    ex.add_argument("-o", "--output", required=True, help="activation store path or fsspec URL")
    ex.add_argument("--layers", required=True, help="comma-separated layer names or aliases (encoder_bottleneck, midblock); `imzarr layers` lists them")
    _model_args(ex)
    ex.add_argument("--sigma", type=float, default=None, help="noise level σ a diffusion network is conditioned on (default: 80, the generator's own; feature networks take none)")
    ex.add_argument("--seed", type=non_negative_int, default=None, help="seed of the per-sample noise of diffusion networks and of --per-class sampling (default: 0)")
    ex.add_argument("--no-noise", action="store_true", help="feed the clean image (still conditioned on σ)")
    ex.add_argument("--class-free", action="store_true", help="zero class labels instead of the one-hot of each sample's label")
    ex.add_argument("--pool", default="none", choices=POOL_MODES, help="spatial reduction on the device before storing")
    ex.add_argument("--dtype", default="float16", choices=STORAGE_DTYPES, help="storage dtype")
    ex.add_argument("--reconstructions", action="store_true", help="also store D(x) as uint8 images (runs the whole network)")
    ex.add_argument("--num-samples", type=positive_int, default=None, help="the first N samples (a uniform random sample if the store was written shuffled; default: all)")
    ex.add_argument("--indices", default=None, help="file of store positions (.npy or one integer per line; default: all)")
    ex.add_argument("--classes", default=None, help="classes to keep: WNIDs, class names or indices, comma-separated (default: all)")
    ex.add_argument("--per-class", type=positive_int, default=None, help="K samples per class, chosen with --seed (default: all)")
    ex.add_argument("--shard-size", type=positive_int, default=None, help="samples per output shard/task (default: ~64 MB of the largest layer)")
    ex.add_argument("--dry-run", action="store_true", help="one batch through the hooks, then a table of shapes, sizes and memory, and whether the run would write a new store, resume one or find it complete; refuses what the run would refuse; writes nothing")
    _run_args(ex)
    ex.set_defaults(handler=_extract)


def _extract(args: argparse.Namespace) -> int:
    keywords = builder_keywords(args, api.extract) | {"noise": not args.no_noise}
    if args.dry_run:
        print(api.dry_run(**keywords))
        return 0
    result = api.extract(**keywords)
    _print_outcome(result, result.url, "these activations come from an UNTRAINED network (random weights of a preset); pass --checkpoint for real ones", result.notes)
    return 0


# --- layers -----------------------------------------------------------------------------------------------------


def _add_layers(sub) -> None:
    layers = add_command(sub, "layers", "list a network's layers and output shapes", "List every layer name (module paths and aliases) with its output shape for one sample.")
    _model_args(layers)
    layers.set_defaults(handler=_print_layers)


def _print_layers(args: argparse.Namespace) -> int:
    table = api.layer_table(**builder_keywords(args, api.layer_table))
    if not table.trained:
        print(f"note: {table.model} is an UNTRAINED preset (seeded random weights)")
    print(f"{'layer':<28} {'module':<26} output shape (per sample)")
    for name, module, shape in table.rows:
        print(f"{name:<28} {module:<26} {shape}")
    return 0


# --- generate ---------------------------------------------------------------------------------------------------


def _add_generate(sub) -> None:
    gen = add_command(
        sub,
        "generate",
        "sample the one-step generator into an image store",
        "DMD2 one-step sampling: image = D(σ·ε; σ, one-hot(label)), ε seeded per sample from (seed, sample index) in a noise stream of its own (not extract's), "
        "converted to uint8 as DMD2 does. Writes an image store (imzarr.images/1, source_format generated) that "
        "`imzarr extract` reads like real data; with --layers, also the generator's own activations while sampling.",
        outputs=("output", "activations_out"),
    )
    gen.add_argument("-o", "--output", required=True, help="generated image store path or fsspec URL")
    _model_args(gen)
    count = gen.add_mutually_exclusive_group(required=True)
    count.add_argument("--per-class", type=positive_int, help="K samples of each class (class-major order)")
    count.add_argument("--num-samples", type=positive_int, help="N samples with classes drawn uniformly (seeded)")
    gen.add_argument("--classes", default=None, help="classes: WNIDs, class names or indices, comma-separated (default: all 1000)")
    gen.add_argument("--seed", type=non_negative_int, default=None, help="noise seed (default: 0)")
    gen.add_argument("--sigma", type=float, default=None, help="the generator's input σ (default: 80)")
    gen.add_argument("--layers", default=None, help="also capture these layers during sampling (needs --activations-out; default: none)")
    gen.add_argument("--activations-out", default=None, help="activation store for --layers (default: none)")
    gen.add_argument("--pool", default="none", choices=POOL_MODES, help="spatial reduction of captured layers")
    gen.add_argument("--dtype", default="float16", choices=STORAGE_DTYPES, help="storage dtype of captured layers")
    gen.add_argument("--shard-size", type=positive_int, default=None, help="samples per shard/task (default 1024 or less)")
    _run_args(gen)
    gen.set_defaults(handler=_generate)


def _generate(args: argparse.Namespace) -> int:
    result = api.generate(**builder_keywords(args, api.generate))
    what = result.url + (f" and {result.activations_url}" if result.activations_url else "")
    _print_outcome(result, what, "generated by an UNTRAINED network (random weights of a preset): these images are noise-like patterns, not ImageNet samples")
    return 0


# --- compare ----------------------------------------------------------------------------------------------------


def _add_compare(sub) -> None:
    cmp = add_command(
        sub,
        "compare",
        "compare two activation stores (or one against saved statistics)",
        "Fréchet distance, KID (Bińkowski et al. 2018), precision/recall (Kynkäänniemi et al. 2019) and density/coverage "
        "(Naeem et al. 2020) between two activation stores in one layer's feature space, overall and per class; "
        "streaming, bounded memory. The first store is taken as the real set, the second as the generated one. With "
        "--reference, one store's FD against saved statistics (an .npz with mu and sigma, as `imzarr stats`, "
        "pytorch-fid --save-stats and EDM's fid.py ref write them).",
        outputs=("output", "plot", "report"),
    )
    cmp.add_argument("stores", nargs="+", metavar="STORE", help="REAL GENERATED activation stores, or one GENERATED store with --reference")
    cmp.add_argument("--layer", required=True, help="layer variable present in both stores")
    cmp.add_argument("--reference", default=None, help="saved statistics (.npz with mu, sigma) to compare one store against (default: none)")
    cmp.add_argument("--metrics", default=None, help="comma-separated from fd,kid,prdc,is (prdc: precision, recall, density, coverage; is: Inception Score of the generated store's --is-layer); default fd,kid,prdc (fd with --reference)")
    cmp.add_argument("--pool", default=None, choices=POOL_MODES, help="spatial reduction of unpooled layers (default: mean); a layer pooled at extraction keeps its pooling, and another --pool is refused")
    cmp.add_argument("--no-per-class", action="store_true", help="overall metrics only")
    cmp.add_argument("-k", type=positive_int, default=5, help="nearest neighbours for precision/recall/density/coverage")
    cmp.add_argument("--prdc-subset", type=non_negative_int, default=10_000, help="samples per side drawn (seeded) for the overall precision/recall/density/coverage, as Naeem et al.; 0: every sample")
    cmp.add_argument("--seed", type=non_negative_int, default=0, help="seed of the --prdc-subset draw")
    cmp.add_argument("--kid-subsets", type=positive_int, default=100, help="KID subsets (default: 100, torch-fidelity's)")
    cmp.add_argument("--kid-subset-size", type=positive_int, default=1000, help="samples per side in each KID subset (default: 1000, torch-fidelity's; per class: at most the class's counts)")
    cmp.add_argument("--kid-seed", type=non_negative_int, default=2020, help="seed of the KID subsets (default: 2020, torch-fidelity's, drawn in its order)")
    cmp.add_argument("--is-layer", default="logits", help="layer holding the classifier logits for --metrics is (fid-inception's 1008-way logits)")
    cmp.add_argument("--is-splits", type=positive_int, default=10, help="Inception Score splits")
    cmp.add_argument("-o", "--output", default=None, help="write the report (an xarray dataset, per-class variables on dim `label`) to this Zarr store; an earlier report there is replaced (default: none)")
    cmp.add_argument("--plot", default=None, help="write a PNG: 2-D projection and per-class panels (default: none)")
    cmp.add_argument("--projection", default="pca", choices=["pca", "umap"], help="projection for --plot (umap needs the optional umap-learn)")
    cmp.add_argument("--report", default=None, metavar="DIR", help="also write the report as a static web site in this folder (see `imzarr report`; default: none)")
    _add_report_thumbnails(cmp)
    cmp.add_argument("--overwrite", action="store_true", help="replace an older-version compare report at --output (an earlier report of this version is replaced anyway; never an input, a store of another kind, or anything else)")
    cmp.set_defaults(handler=_compare)


def _compare(args: argparse.Namespace) -> int:
    # Progress (and "already complete" for a report made from the same inputs) on stderr, the results on stdout.
    run = api.compare(**builder_keywords(args, api.compare, api.compare_options, prdc_seed="seed") | {"per_class": not args.no_per_class, "log": sys.stderr})
    print(api.format_report_table(run.report))
    for label, path in (("report", args.output), ("plot", args.plot)):
        if path:
            print(f"{label}: {path}")
    if run.site is not None:
        _print_site(run.site)
    return 0


# --- report -----------------------------------------------------------------------------------------------------


def _add_report(sub) -> None:
    rep = add_command(
        sub,
        "report",
        "compare report → static web site",
        "Write a compare report as a static site (DIR/index.html and its files) that opens from disk or any static "
        "server: provenance, overall numbers, a sortable per-class table and, per class, real and generated "
        "samples side by side with each generated sample's nearest real one. Images are found through the "
        "stores' provenance (compare report → activation stores → image stores).",
        outputs=("output",),
    )
    rep.add_argument("compare", help="compare report (the Zarr store `imzarr compare -o` wrote)")
    rep.add_argument("-o", "--output", required=True, metavar="DIR", help="folder to write the site to (path or fsspec URL); an earlier report site there is replaced, anything else refused")
    _add_report_thumbnails(rep)
    rep.set_defaults(handler=_report)


def _add_report_thumbnails(p: argparse.ArgumentParser) -> None:
    p.add_argument("--per-class-thumbnails", type=positive_int, default=None, metavar="N", help="real and generated samples shown per class in the report site (default: 16)")


def _report(args: argparse.Namespace) -> int:
    _print_site(api.report_site(args.compare, args.output, per_class_thumbnails=args.per_class_thumbnails, log=sys.stderr))
    return 0


# --- stats ------------------------------------------------------------------------------------------------------


def _add_stats(sub) -> None:
    st = add_command(
        sub,
        "stats",
        "reference statistics (mu, sigma) of a layer; Inception Score",
        "Mean and covariance of a layer's features, streamed in bounded memory, written as an .npz with mu (float64, D) "
        "and sigma (float64, D×D) that pytorch-fid and EDM's fid.py read as their own reference statistics; with "
        "--per-class, a Zarr store of per-class mu/sigma/count on dimension `label`. --inception-score prints the "
        "Inception Score of the store's logits layer.",
        outputs=("output",),
    )
    st.add_argument("store", help="activation store")
    st.add_argument("--layer", default=None, help="layer whose features the statistics describe (default: none; needed with -o)")
    st.add_argument("-o", "--output", default=None, help="ref.npz (or, with --per-class, a Zarr store) to write (default: none)")
    st.add_argument("--per-class", action="store_true", help="per-class statistics into a Zarr store (refused, with the size it would take, when it does not fit on the output's disk)")
    st.add_argument("--pool", default=None, choices=POOL_MODES, help="spatial reduction of unpooled layers (default: mean); a layer pooled at extraction keeps its pooling, and another --pool is refused")
    st.add_argument("--inception-score", action="store_true", help="also compute the Inception Score of --is-layer (10 splits, torch-fidelity's order)")
    st.add_argument("--is-layer", default="logits", help="layer holding the classifier logits (fid-inception's 1008-way logits)")
    st.add_argument("--is-splits", type=positive_int, default=10, help="Inception Score splits")
    st.add_argument("--overwrite", action="store_true", help="replace an existing output file or statistics store (never an input)")
    st.set_defaults(handler=_stats)


def _stats(args: argparse.Namespace) -> int:
    result = api.stats(**builder_keywords(args, api.stats, api.statistics_options) | {"log": sys.stderr})
    if result.inception_score is not None:
        s = result.inception_score
        print(f"Inception Score {s.mean!r} ± {s.std!r} ({s.splits} splits of {s.samples} samples, layer {args.is_layer})")
    if result.statistics is not None:
        print(f"{result.output}: mu ({result.statistics.dim},), sigma ({result.statistics.dim}, {result.statistics.dim}) of {result.statistics.count} samples in {result.seconds:.1f} s")
    elif args.per_class:
        print(f"{result.output}: per-class statistics in {result.seconds:.1f} s")
    return 0


# --- show -------------------------------------------------------------------------------------------------------


def _add_show(sub) -> None:
    show = add_command(sub, "show", "contact sheet of a store's images", "A grid of images, one row per class, with class names: real, generated or reconstructions.", outputs=("output",))
    show.add_argument("store", help="image store, or activation store with reconstructions")
    show.add_argument("-o", "--output", default="grid.png", help="PNG to write")
    show.add_argument("--classes", default=None, help="classes: WNIDs, class names or indices, comma-separated (default: the first classes in the store)")
    show.add_argument("--per-class", type=positive_int, default=8, help="images per row")
    show.add_argument("--max-classes", type=positive_int, default=10, help="rows when --classes is not given")
    show.set_defaults(handler=_show)


def _show(args: argparse.Namespace) -> int:
    print(api.show(**builder_keywords(args, api.show)))
    return 0


def main(argv: list[str] | None = None) -> int:
    """`python -m extractor COMMAND …` (the same as `imzarr COMMAND …`)."""
    parser = CommandParser(prog="python -m extractor", description="Run image stores through networks; compare and show the results.", formatter_class=HelpFormatter)
    add_commands(parser.add_subparsers(dest="command", metavar="COMMAND", required=True))
    return dispatch(parser, list(sys.argv[1:] if argv is None else argv))
