"""Cleaning a user's RELION particle set with the registered model (``clean_job``)."""

from pathlib import Path

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from particleseg_assets.assets.corpus import write_manifest
from particleseg_assets.assets.model import segmentation_model
from particleseg_assets.resources import StorageResource


class CleanConfig(Config):
    star: str
    """The RELION particle STAR file to clean (3.0, 3.1 or 5.0); it is never modified."""
    model_version: str = ""
    """A registered version ("v0002" or "2"); empty: the latest."""
    drop: float = 0.3
    """Fraction of the readable particles to drop, the lowest scores first (the paper: 0.3)."""
    keep_above: float | None = None
    """Keep the particles scoring above this instead of dropping a fraction."""
    score: str = "ets"
    """"ets" (the paper's edge-to-signal ratio) or "calibrated" (also drops too-high ETS and
    atypical signal areas)."""
    particles_dir: str = ""
    """Where the stacks' paths start (empty: the STAR file's folder)."""
    on_bad: str = "skip"
    """Rows whose image is missing or unreadable: "skip" (dropped and counted) or "stop"."""
    name: str = ""
    """Output folder under $PARTICLESEG_DATA/cleaned (empty: the STAR file's stem)."""


@asset(group_name="cleaning", deps=[segmentation_model], kinds={"keras", "star"}, pool="train")
def cleaned_particles(
    context: AssetExecutionContext, config: CleanConfig, storage: StorageResource
) -> MaterializeResult:
    """A user's particle STAR file segmented by the model, every particle scored (ETS or the
    calibrated score), the lowest dropped, and the cleaned STAR written in the input's RELION
    version with every column and the optics table, beside the score table of all particles,
    the score histogram with the cut and a gallery of low, median and high scores."""
    from particleseg_model.cleaning.clean import clean_star
    from particleseg_model.figures import markdown_image
    from particleseg_model.model.registry import get_model

    star = Path(config.star).expanduser()
    name = config.name or star.stem
    out_dir = storage.path("cleaned", name)
    out_dir.mkdir(parents=True, exist_ok=True)
    models_root = storage.models_root()  # a local path or a URL (object storage)
    model = get_model(models_root, config.model_version).address if config.model_version else None
    drop = None if config.keep_above is not None else config.drop
    # our own folder: outputs are replaced (each written to a temporary name, then renamed)
    result = clean_star(
        star,
        out_dir / f"{star.stem}_cleaned.star",
        model=model,
        models_root=models_root,
        drop=drop,
        keep_above=config.keep_above,
        score=config.score,
        particles_dir=config.particles_dir or None,
        report_dir=out_dir / "report",
        scores_out=out_dir / "scores.parquet",
        on_bad=config.on_bad,
        overwrite=True,
        progress=False,
        log=context.log.info,
    )
    context.log.info(
        f"{star}: kept {result.kept} of {result.total} particles "
        f"({result.dropped} dropped by {result.score}, {result.skipped} unreadable) "
        f"with model {result.model_version} at {result.particles_per_s:.0f} "
        f"particles/s: {result.out}"
    )
    write_manifest(
        out_dir,
        {
            "source_star": str(star.resolve()),
            "cleaned_star": str(result.out),
            "scores": str(result.scores_path),
            "model_version": result.model_version,
            "score": result.score,
            "kept": result.kept,
            "total": result.total,
            "cut": result.cut,
            "dagster_run_id": context.run.run_id,
        },
    )
    metadata = {
        "source_star": MetadataValue.path(str(star.resolve())),
        "cleaned_star": MetadataValue.path(str(result.out)),
        "scores": MetadataValue.path(str(result.scores_path)),
        "model_version": result.model_version,
        "score": result.score,
        "relion_version": result.version,
        "particles_before": result.total,
        "particles_after": result.kept,
        "dropped": result.dropped,
        "unreadable": result.skipped,
        "cut": float(result.cut),
        "particles_per_s": round(result.particles_per_s, 1),
        "score_histogram": MetadataValue.md(
            markdown_image(result.report["score_histogram.png"], "score histogram with the cut")
        ),
        "gallery": MetadataValue.md(
            markdown_image(
                result.report["gallery.png"], "lowest, median and highest scores with their masks"
            )
        ),
    }
    return MaterializeResult(metadata=metadata)
