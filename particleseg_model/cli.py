"""The ``particleseg`` command line: one function per subcommand."""

from __future__ import annotations

import argparse
import errno
import logging
import sys
import traceback
from pathlib import Path
from typing import Any

import pandas as pd


def serve_archive(args: argparse.Namespace) -> int:
    """Serve a mirror directory as the EMPIAR, EMDB and archive APIs on loopback."""
    from particleseg_model.access.fixtures import write_fixture_mirror
    from particleseg_model.access.server import ArchiveServer

    if args.fixture:
        write_fixture_mirror(args.dir)
    server = ArchiveServer(args.dir, host=args.host, port=args.port)
    print(f"serving {Path(args.dir).resolve()} at {server.url}", flush=True)
    for name, value in server.env().items():
        print(f"export {name}={value}", flush=True)
    try:
        server.serve_forever()
    except KeyboardInterrupt:
        pass
    finally:
        server.stop()
    return 0


def mirror_fixture(args: argparse.Namespace) -> int:
    """Write the embedded fixture catalog (or a synthetic one) into a mirror directory."""
    from particleseg_model.access.fixtures import write_fixture_mirror, write_synthetic_mirror

    if args.synthetic:
        mirror = write_synthetic_mirror(args.out, args.synthetic, seed=args.seed)
    else:
        mirror = write_fixture_mirror(args.out)
    print(f"{len(mirror.entry_ids())} entries in {mirror.root}")
    return 0


def catalog(args: argparse.Namespace) -> int:
    """Refresh a catalog Parquet file (incrementally) and print the eligible entries."""
    from particleseg_model.access.catalog import (
        read_catalog,
        refresh_catalog,
        select_eligible,
        write_parquet,
    )
    from particleseg_model.access.empiar import EmdbClient, EmpiarClient
    from particleseg_model.progress import progress

    previous = None if args.full else read_catalog(args.out)
    bar = progress(total=None, desc="EMDB resolutions", unit="map")

    def on_progress(done: int, total: int) -> None:
        bar.total = total
        bar.update(done - bar.n)

    refresh = refresh_catalog(EmpiarClient(), EmdbClient(), previous, on_progress=on_progress)
    bar.close()
    write_parquet(refresh.table, args.out)
    for error in refresh.errors:
        print(f"warning: {error}", file=sys.stderr)
    eligible = select_eligible(refresh.table, args.max_resolution, inclusive=args.inclusive)
    print(
        f"{len(refresh.table)} entries ({len(refresh.new_ids)} new, {len(refresh.updated_ids)} "
        f"updated) -> {args.out}; {len(eligible)} eligible"
    )
    print_eligible(eligible)
    print("\n".join(explain_eligible(refresh.table, eligible)))
    return 0


def print_eligible(eligible: pd.DataFrame) -> None:
    """A table a person reads: id, best map, resolution, size, what ships, title."""
    print(f"{'entry':<13} {'map':<10} {'res/A':>5} {'size':>9}  {'ships':<11} title")
    for row in eligible.itertuples(index=False):
        size = row.dataset_size_bytes
        size_text = (
            "?"
            # itertuples' fields are typed as any scalar; this is a float column (NaN: unknown)
            if pd.isna(size)  # pyright: ignore[reportArgumentType, reportCallIssue]
            else (f"{size / 1e12:.1f} TB" if size >= 1e12 else f"{size / 1e9:.1f} GB")  # pyright: ignore[reportOperatorIssue]
        )
        ships = "particles" if row.ships_particles else "coordinates"
        print(
            f"{row.empiar_id:<13} {row.best_emdb_id:<10} {row.best_resolution_a:>5.2f} "
            f"{size_text:>9}  {ships:<11} {str(row.title)[:70]}"
        )


def explain_eligible(catalog: pd.DataFrame, eligible: pd.DataFrame) -> list[str]:
    """Lines saying where an eligible count comes from and why the other entries are not.

    Parameters
    ----------
    catalog
        The whole catalog table (``empiar_entries``).
    eligible
        The entries the rule selected (``eligible_entries``).

    Returns
    -------
    list of str
        Eligible entries by origin (real, synthetic fixture, simulated demo: from the title's
        ``[fixture]`` / ``[simulated]`` tag), the catalog's other entries by reason, and each
        entry that passes on resolution but has no fetchable particle set, with its reason.
    """
    from particleseg_model.access.catalog import select_not_fetchable

    def origin(title: object) -> str:
        text = str(title)
        return (
            "simulated"
            if text.startswith("[simulated]")
            else ("synthetic fixture" if text.startswith("[fixture]") else "real")
        )

    by_origin = eligible["title"].map(origin).value_counts()
    parts = [f"{by_origin.get(k, 0)} {k}" for k in ("real", "synthetic fixture", "simulated")]
    lines = [f"eligible: {len(eligible)} of {len(catalog)} ({', '.join(parts)})"]
    not_fetchable = select_not_fetchable(catalog)
    rest = catalog[~catalog["empiar_id"].isin(set(eligible["empiar_id"]))]
    status = rest["status"].fillna("").str.upper()
    errors = rest["error"].fillna("") != ""
    obsolete = status.str.startswith("OBS")
    counts = {
        "obsolete": int(obsolete.sum()),
        "with an error": int((errors & ~obsolete).sum()),
        "no fetchable particle set": len(not_fetchable),
    }
    counts["map not better than the limit (or none)"] = len(rest) - sum(counts.values())
    lines.append("not eligible: " + ", ".join(f"{n} {why}" for why, n in counts.items() if n))
    for row in not_fetchable.itertuples(index=False):
        lines.append(f"  {row.empiar_id}: {row.not_fetchable_reason}")
    return lines


def download(args: argparse.Namespace) -> int:
    """Download an archive file or directory (resumable, size-checked, atomic)."""
    from particleseg_model.access.archive import download as download_file
    from particleseg_model.access.archive import download_tree

    if args.url.endswith("/"):
        paths = download_tree(args.url, args.dest)
        print(f"{len(paths)} files in {args.dest}")
    else:
        print(download_file(args.url, args.dest))
    return 0


def star_info(args: argparse.Namespace) -> int:
    """Summarise a RELION particle STAR file as the canonical table sees it."""
    from particleseg_model.em.star import has_poses, read_star

    star = read_star(args.star)
    particles = star.particles
    print(
        f"{star.source}: RELION {star.version}, {len(particles)} particles, "
        f"{0 if star.optics is None else len(star.optics)} optics groups, "
        f"poses: {'yes' if has_poses(particles) else 'no'}"
    )
    print(particles.head(args.rows).to_string())
    return 0


def demo_archive(args: argparse.Namespace) -> int:
    """Simulate EMPIAR entries from density maps: particles, junk, micrographs, ground truth."""
    from particleseg_model.simulation.demo_archive import write_demo_archive
    from particleseg_model.simulation.simulate import JUNK_KINDS

    kinds = (
        JUNK_KINDS
        if args.junk_kinds is None
        else tuple(kind.strip() for kind in args.junk_kinds.split(",") if kind.strip())
    )
    ids = write_demo_archive(
        args.out,
        maps=args.maps or None,
        n_particles=args.particles,
        box=args.box,
        junk_fraction=args.junk_fraction,
        seed=args.seed,
        snr=args.snr,
        junk_kinds=kinds,
        micrograph_entries=args.micrograph_entries,
        micrograph_size=args.micrograph_size,
        particles_per_stack=args.particles_per_stack,
        progress=not args.no_progress,
    )
    out = Path(args.out)
    for empiar_id in ids:
        number = empiar_id.split("-")[1]
        print(
            f"{empiar_id}: {out / 'archive' / number / 'data'}  "
            f"(gallery: {out / 'archive' / number / 'data' / 'gallery.png'})"
        )
    print(
        f"{len(ids)} simulated entries in {out}; serve them with `particleseg serve-archive {out}`"
    )
    return 0


def _out_of_distribution(result: Any, consequence: str = "") -> str:
    """The summary line's suffix when the model found no signal in most particles."""
    if not result.out_of_distribution:
        return ""
    return (
        f"; out of distribution: no signal in {100 * result.no_signal_share:.1f}% of the "
        f"readable particles{consequence}"
    )


def segment(args: argparse.Namespace) -> int:
    """Segment every particle of a RELION STAR file: label masks (Zarr, STAR row order)."""
    from particleseg_model.cleaning.segment import segment_star

    result = segment_star(
        args.star,
        args.out,
        model=args.model,
        models_root=args.models_root,
        particles_dir=args.particles_dir,
        batch=args.batch,
        progress=False if args.no_progress else None,
        log=lambda line: print(line, file=sys.stderr),
    )
    unreadable = f"; {result.unreadable} unreadable" if result.unreadable else ""
    ood = _out_of_distribution(result)
    print(
        f"{result.particles} particles segmented with model {result.model_version} in "
        f"{result.seconds:.1f} s ({result.particles_per_s:.0f} particles/s): {result.out}"
        f"{unreadable}{ood}"
    )
    return 0


def _clean_cs(args: argparse.Namespace) -> int:
    """``clean`` of a cryoSPARC .cs file: the kept rows and their passthrough file as .cs."""
    from particleseg_model.cleaning.cs_clean import clean_cs

    if args.classify:
        print(
            "particleseg clean: error: --classify needs a RELION STAR input (RELION runs the "
            f"classification); {args.star} is a cryoSPARC .cs file",
            file=sys.stderr,
        )
        return 1
    result, written, passthrough = clean_cs(
        args.star,
        args.out,
        particles_dir=args.particles_dir,
        scores_out=args.scores,
        overwrite=args.overwrite,
        model=args.model,
        models_root=args.models_root,
        drop=args.drop,
        keep_above=args.keep_above,
        score=args.score,
        report_dir=args.report,
        on_bad=args.on_bad,
        batch=args.batch,
        progress=False if args.no_progress else None,
        log=lambda line: print(line, file=sys.stderr),
    )
    print(
        f"kept {result.kept}/{result.total} particles ({result.score} score, cut "
        f"{result.cut:.4g}), model {result.model_version}: {written} (every field as read) "
        f"and {passthrough}; scores: {result.scores_path}"
    )
    return 0


def _classify_cleaning(args: argparse.Namespace, scores_path: Path) -> str:
    """``clean --classify K``: classify the input, the cleaned set and a random drop of the
    same size with the same parameters; returns the summary lines."""
    from particleseg_model.cleaning.compare import classify_before_after

    scores = (
        pd.read_csv(scores_path)
        if scores_path.suffix.lower() == ".csv"
        else pd.read_parquet(scores_path)
    )
    out = Path(args.classify_out or Path(args.out).with_name(f"{Path(args.out).stem}_classify"))
    comparison = classify_before_after(
        args.star,
        scores["keep"].to_numpy(dtype=bool),
        out,
        classes=args.classify,
        iterations=args.classify_iterations,
        threads=args.threads,
        truth=args.truth,
        particles_dir=args.particles_dir,
        overwrite=args.overwrite,
        log=lambda line: print(line, file=sys.stderr),
    )
    lines = [f"2D classification before/after (K={args.classify}): {comparison.gallery}"]
    for row in comparison.table.to_dict(orient="records"):
        text = f"  {row['condition']:<12} {row['particles']:>7} particles, {row['seconds']:.0f} s"
        if "particles_in_good_classes" in row:
            text += (
                f", {row['particles_in_good_classes']} in {row['good_classes']} good classes "
                f"({100 * row['good_class_share']:.1f}%), {row['good_in_good_classes']} good "
                "particles recovered"
            )
        lines.append(text)
    ratios = comparison.ratios()
    if ratios:
        lines.append(
            f"  particles in good classes after/before: x{ratios['after']:.2f} cleaning, "
            f"x{ratios['random_drop']:.2f} random drop (paper: x1.39)"
        )
    lines.append(f"  summary: {comparison.summary_csv}")
    return "\n".join(lines)


def clean(args: argparse.Namespace) -> int:
    """Clean a RELION particle set: score each particle's predicted mask, drop the worst."""
    from particleseg_model.cleaning.clean import clean_star

    if str(args.star).endswith(".cs"):
        return _clean_cs(args)
    if args.classify is not None:  # refused before the cleaning: too few for K classes
        from particleseg_model.em.star import read_star
        from particleseg_model.relion.classify import minimum_particles

        n = len(read_star(args.star).particles)
        if n < minimum_particles(args.classify):
            raise ValueError(
                f"{args.star}: {n} particles are too few for --classify {args.classify}: "
                f"2D classification needs at least {minimum_particles(args.classify)}"
            )
    result = clean_star(
        args.star,
        args.out,
        model=args.model,
        models_root=args.models_root,
        drop=args.drop,
        keep_above=args.keep_above,
        score=args.score,
        particles_dir=args.particles_dir,
        report_dir=args.report,
        scores_out=args.scores,
        on_bad=args.on_bad,
        batch=args.batch,
        overwrite=args.overwrite,
        progress=False if args.no_progress else None,
        log=lambda line: print(line, file=sys.stderr),
    )
    report = f"; report: {Path(args.report)}" if args.report else ""
    ood = _out_of_distribution(result, ", none dropped")
    print(
        f"kept {result.kept}/{result.total} particles ({result.score} score, cut "
        f"{result.cut:.4g}), dropped {result.dropped}, skipped {result.skipped} unreadable, "
        f"model {result.model_version}, {result.particles_per_s:.0f} particles/s: "
        f"{result.out} (RELION {result.version}); scores: {result.scores_path}{report}{ood}"
    )
    if args.classify is not None:
        from particleseg_model.relion.classify import ClassifyError

        try:
            print(_classify_cleaning(args, result.scores_path))
        except ClassifyError as exc:  # RELION's own error text and the kept run folder
            print(f"particleseg clean: error: {exc}", file=sys.stderr)
            return 1
    return 0


def classify(args: argparse.Namespace) -> int:
    """RELION 2D classification of a particle STAR file: classes, averages, gallery."""
    from particleseg_model.relion.classify import ClassifyError, classify_2d

    try:
        result = classify_2d(
            args.star,
            args.out,
            classes=args.classes,
            iterations=args.iterations,
            diameter_a=args.diameter_a,
            threads=args.threads,
            mpi=args.mpi,
            truth=args.truth,
            particles_dir=args.particles_dir,
            seed=args.seed,
            overwrite=args.overwrite,
            progress=False if args.no_progress else None,
            log=lambda line: print(line, file=sys.stderr),
        )
    except ClassifyError as exc:  # RELION's own error text and the kept run folder
        print(f"particleseg classify: error: {exc}", file=sys.stderr)
        return 1
    summary = result.summary()
    good = (
        f"; {summary['particles_in_good_classes']} particles in {len(summary['good_classes'])} "
        f"good classes ({100 * summary['good_class_share']:.1f}%), "
        f"{summary['good_in_good_classes']} of {summary['good_particles']} good particles "
        f"recovered"
        if result.truth is not None
        else ""
    )
    print(
        f"{summary['particles']} particles in {result.k} classes ({result.iterations} "
        f"iterations, {result.seconds:.0f} s; largest class "
        f"{int(result.classes['particles'].iloc[0])}){good}: {result.star} (RELION "
        f"{result.version}), {result.table}, {result.gallery}"
    )
    return 0


def relion_external(args: argparse.Namespace) -> int:
    """ParticleSeg cleaning as a RELION External job (--o JOB --in_parts STAR [--param value])."""
    from particleseg_model.cleaning.external import run_external

    return run_external(args)


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog="particleseg",
        description=__doc__,
        epilog="exit status: 0 done; 1 bad input (file, row or value named); 2 usage; 3 "
        "environment (disk full, read-only folder, network, RELION); 4 internal error (a bug: "
        "--verbose shows the traceback); 130 interrupted. Nothing a command reads is written.",
    )
    parser.add_argument("-v", "--verbose", action="store_true", help="log debug messages")
    sub = parser.add_subparsers(dest="command", required=True)

    p = sub.add_parser("serve-archive", help=serve_archive.__doc__)
    p.add_argument("dir", help="mirror directory (layout: particleseg_model.access.mirror)")
    p.add_argument("--host", default="127.0.0.1", help="bind address (default loopback)")
    p.add_argument("--port", type=int, default=8000, help="0 picks a free port")
    p.add_argument("--fixture", action="store_true", help="write the embedded fixture first")
    p.set_defaults(func=serve_archive)

    p = sub.add_parser("mirror-fixture", help=mirror_fixture.__doc__)
    p.add_argument("out", help="mirror directory to write")
    p.add_argument("--synthetic", type=int, default=0, help="N synthetic entries instead")
    p.add_argument("--seed", type=int, default=0)
    p.set_defaults(func=mirror_fixture)

    p = sub.add_parser("catalog", help=catalog.__doc__)
    p.add_argument("--out", default="data/catalog/empiar_entries.parquet")
    p.add_argument("--full", action="store_true", help="ignore the stored catalog")
    p.add_argument("--max-resolution", type=float, default=3.5, help="Angstrom (default 3.5)")
    p.add_argument("--inclusive", action="store_true", help="accept maps at exactly the limit")
    p.set_defaults(func=catalog)

    p = sub.add_parser("download", help=download.__doc__)
    p.add_argument("url", help="archive URL (a trailing / downloads the directory)")
    p.add_argument("dest")
    p.set_defaults(func=download)

    p = sub.add_parser("demo-archive", help=demo_archive.__doc__)
    p.add_argument("out", help="mirror directory to create (must not hold an archive)")
    p.add_argument(
        "--maps",
        nargs="+",
        metavar="MAP",
        help="map files or generated:SHAPE, one entry each (default: EMD-1832, "
        "EMD-5625 from ../shared/data when present, else generated maps)",
    )
    p.add_argument("--particles", type=int, default=600, help="particles (picks) per entry")
    p.add_argument("--box", type=int, default=128, help="particle box in pixels (even)")
    p.add_argument("--junk-fraction", type=float, default=0.3, help="share of junk, in [0, 1)")
    p.add_argument(
        "--junk-kinds",
        default=None,
        help="comma-separated subset of empty,ice,carbon_edge,aggregate,"
        "off_centre,fragment (default: all)",
    )
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--snr", type=float, default=0.1, help="per-pixel signal-to-noise ratio")
    p.add_argument(
        "--micrograph-entries",
        type=int,
        default=1,
        help="how many of the last entries ship micrographs + coordinates",
    )
    p.add_argument("--micrograph-size", type=int, default=1024, help="pixels")
    p.add_argument("--particles-per-stack", type=int, default=1000)
    p.add_argument("--no-progress", action="store_true", help="no progress bars")
    p.set_defaults(func=demo_archive)

    p = sub.add_parser("segment", help=segment.__doc__)
    p.add_argument("star", help="RELION particle STAR file (3.0, 3.1 or 5.0)")
    p.add_argument("--out", required=True, help="Zarr group to write (must not exist)")
    p.add_argument(
        "--model",
        default=None,
        help="a registered model version folder or its model.keras (default: the "
        "latest under --models-root)",
    )
    p.add_argument(
        "--models-root",
        default=None,
        help="model registry (default: $PARTICLESEG_DATA/models or data/models)",
    )
    p.add_argument(
        "--particles-dir",
        default=None,
        help="where the stacks' paths start (default: the STAR file's folder)",
    )
    p.add_argument("--batch", type=int, default=256, help="particles per batch")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=segment)

    p = sub.add_parser("clean", help=clean.__doc__)
    p.add_argument(
        "star", help="RELION particle STAR file (3.0, 3.1 or 5.0) or cryoSPARC .cs file"
    )
    p.add_argument(
        "--out",
        required=True,
        help="cleaned STAR file to write, in the input's RELION version (never the "
        "input; must not exist unless --overwrite)",
    )
    p.add_argument(
        "--model",
        default=None,
        help="a registered model version folder or its model.keras (default: the "
        "latest under --models-root)",
    )
    p.add_argument(
        "--models-root",
        default=None,
        help="model registry (default: $PARTICLESEG_DATA/models or data/models)",
    )
    rule = p.add_mutually_exclusive_group()
    rule.add_argument(
        "--drop",
        type=float,
        default=None,
        help="fraction of the readable particles to drop, lowest scores first, "
        "in [0, 1) (default 0.3, the paper's)",
    )
    rule.add_argument(
        "--keep-above",
        type=float,
        default=None,
        metavar="SCORE",
        help="keep the particles scoring above SCORE instead",
    )
    p.add_argument(
        "--score",
        choices=["ets", "calibrated", "centred"],
        default="centred",
        help="centred: the share of the central disc predicted signal, drops empty and "
        "off-centre picks (the default: best on real and simulated particles); ets: the "
        "paper's edge/signal ratio; calibrated: also drops fragments, aggregates and empty "
        "particles",
    )
    p.add_argument(
        "--report",
        default=None,
        metavar="DIR",
        help="folder for score_histogram.png, gallery.png and report.json",
    )
    p.add_argument(
        "--scores",
        default=None,
        metavar="PATH",
        help="per-particle scores (.parquet, or .csv; default "
        "<out stem>_scores.parquet beside --out)",
    )
    p.add_argument(
        "--particles-dir",
        default=None,
        help="where the stacks' paths start (default: the STAR file's folder)",
    )
    p.add_argument(
        "--on-bad",
        choices=["skip", "stop"],
        default="skip",
        help="a missing or unreadable image: skip (drop) it and count, or stop",
    )
    p.add_argument("--batch", type=int, default=256, help="particles per batch")
    p.add_argument(
        "--overwrite",
        action="store_true",
        help="replace an existing --out and --scores (never an input: the STAR, its "
        "stacks, the model's files)",
    )
    p.add_argument(
        "--classify",
        type=int,
        default=None,
        metavar="K",
        help="then 2D-classify (RELION) the input, the cleaned set and a random drop of the "
        "same size into K classes, same parameters: galleries side by side and a summary",
    )
    p.add_argument(
        "--classify-out",
        default=None,
        metavar="DIR",
        help="folder of the classifications (default <out stem>_classify beside --out)",
    )
    p.add_argument(
        "--classify-iterations", type=int, default=25, help="RELION --iter (default 25)"
    )
    p.add_argument("--threads", type=int, default=2, help="RELION --j (default 2)")
    p.add_argument(
        "--truth",
        default=None,
        help="ground truth CSV for --classify (image_name, is_good; default "
        "ground_truth.csv beside the STAR)",
    )
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=clean)

    p = sub.add_parser("classify", help=classify.__doc__)
    p.add_argument("star", help="RELION particle STAR file (3.0, 3.1 or 5.0) with CTF")
    p.add_argument("--classes", "-K", type=int, required=True, help="number of classes K")
    p.add_argument(
        "--out", required=True, help="output folder (must not exist unless --overwrite)"
    )
    p.add_argument("--iterations", type=int, default=25, help="RELION --iter (default 25)")
    p.add_argument(
        "--diameter-a",
        type=float,
        default=None,
        help="mask diameter in Angstrom (default 90%% of the box)",
    )
    p.add_argument("--threads", type=int, default=2, help="RELION --j (default 2)")
    p.add_argument(
        "--mpi",
        type=int,
        default=None,
        help="run relion_refine_mpi with this many MPI ranks (slower on 2 cores)",
    )
    p.add_argument(
        "--truth",
        default=None,
        help="ground truth CSV (image_name, is_good; default ground_truth.csv beside the STAR)",
    )
    p.add_argument(
        "--particles-dir",
        default=None,
        help="where the stacks' paths start (default: the STAR file's folder)",
    )
    p.add_argument("--seed", type=int, default=0, help="RELION --random_seed")
    p.add_argument("--overwrite", action="store_true", help="replace an existing --out")
    p.add_argument("--no-progress", action="store_true", help="no progress bar")
    p.set_defaults(func=classify)

    from particleseg_model.cleaning.external import add_external_arguments

    p = sub.add_parser("relion-external", help=relion_external.__doc__)
    add_external_arguments(p)
    p.set_defaults(func=relion_external)

    p = sub.add_parser("star-info", help=star_info.__doc__)
    p.add_argument("star")
    p.add_argument("--rows", type=int, default=5)
    p.set_defaults(func=star_info)
    return parser


EXIT_BAD_INPUT = 1
"""The input or an argument is wrong: a malformed STAR/MRC/model file, a path that does not
exist (or exists already), a value out of range, a rule that keeps nothing."""
EXIT_USAGE = 2
"""The command line itself is wrong (argparse: unknown option, missing argument)."""
EXIT_ENVIRONMENT = 3
"""The machine or the network failed: a full disk, a read-only or unwritable folder, a server
that refuses, is gone or answers 404, an external program (RELION) that fails."""
EXIT_INTERNAL = 4
"""A bug: an error the code does not expect (run with --verbose for the traceback)."""
EXIT_INTERRUPTED = 130
"""Ctrl-C (SIGINT), as a shell reports it; outputs are written atomically, so none is left half
written."""

# OSErrors that say a path given is wrong (the user's to fix), not that the machine failed
_PATH_ERRNOS = {errno.ENOENT, errno.EEXIST, errno.EISDIR, errno.ENOTDIR, errno.ENAMETOOLONG}


def error_line(exc: BaseException) -> tuple[str, int]:
    """The one line a user sees for ``exc`` and the exit status (the ``EXIT_*`` codes).

    Parameters
    ----------
    exc
        What a subcommand raised.

    Returns
    -------
    tuple of (str, int)
        The message (naming the file, and the row where there is one: the library's errors
        do) and the exit status.
    """
    from particleseg_model.access.archive import DownloadError
    from particleseg_model.access.http import HttpError

    if isinstance(exc, KeyboardInterrupt):
        return "interrupted; no output is left half written", EXIT_INTERRUPTED
    if isinstance(exc, HttpError | DownloadError):
        return str(exc), EXIT_ENVIRONMENT
    if isinstance(exc, OSError):
        text = str(exc)
        if exc.filename is not None:
            where = f"{exc.filename}" + (f" -> {exc.filename2}" if exc.filename2 else "")
            text = f"{where}: {exc.strerror or exc}"
        wrong_path = exc.errno in _PATH_ERRNOS or exc.errno is None
        code = EXIT_BAD_INPUT if wrong_path and not isinstance(exc, PermissionError) else (
            EXIT_ENVIRONMENT
        )
        return text, code
    if isinstance(exc, ValueError):
        # StarError, MrcError, ModelError, EntryError, ...: they name their file or entry
        return str(exc), EXIT_BAD_INPUT
    if isinstance(exc, RuntimeError) and type(exc).__module__.startswith("particleseg_model"):
        return str(exc), EXIT_ENVIRONMENT  # RelionError and kin: an external program failed
    return (
        f"internal error: {type(exc).__name__}: {exc} (a bug: run again with --verbose for "
        "the traceback, and report it)",
        EXIT_INTERNAL,
    )


def main(argv: list[str] | None = None) -> int:
    """Run one subcommand; every failure is one line on stderr and an ``EXIT_*`` status
    (``--verbose`` prints the traceback first)."""
    args = build_parser().parse_args(argv)
    logging.basicConfig(
        level=logging.DEBUG if args.verbose else logging.INFO,
        format="%(levelname)s %(name)s: %(message)s",
    )
    try:
        return args.func(args)
    except (Exception, KeyboardInterrupt) as exc:
        if args.verbose:
            traceback.print_exc()
        line, code = error_line(exc)
        print(f"particleseg {args.command}: error: {line}", file=sys.stderr)
        return code


if __name__ == "__main__":
    sys.exit(main())
