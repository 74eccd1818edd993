"""Cleaning a user's RELION particle set with the registered model (``clean_job``)."""

from pathlib import Path

from dagster import AssetExecutionContext, Config, MaterializeResult, MetadataValue, asset

from particleseg_assets.assets.model import segmentation_model
from particleseg_assets.resources import StorageResource
from particleseg_model.cleaning.clean import clean_to_folder
from particleseg_model.figures import markdown_image


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
    star = Path(config.star).expanduser()
    result = clean_to_folder(
        star,
        storage.path("cleaned", config.name or star.stem),
        model_version=config.model_version or None,
        models_root=storage.models_root(),  # a local path or a URL (object storage)
        drop=config.drop,
        keep_above=config.keep_above,
        score=config.score,
        particles_dir=config.particles_dir or None,
        on_bad=config.on_bad,
        run_id=context.run.run_id,
        log=context.log.info,
    )
    report = result.report
    gallery_alt = "lowest, median and highest scores with their masks"
    return MaterializeResult(
        metadata={
            "source_star": MetadataValue.path(str(star.resolve())),
            "cleaned_star": MetadataValue.path(str(result.out)),
            "scores": MetadataValue.path(str(result.scores_path)),
            **result.summary(),
            "score_histogram": MetadataValue.md(
                markdown_image(report["score_histogram.png"], "score histogram with the cut")
            ),
            "gallery": MetadataValue.md(markdown_image(report["gallery.png"], gallery_alt)),
        }
    )
