"""Cleaning a user's RELION particle set with the registered model (``clean_job``)."""

from pathlib import Path

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset
from pydantic import Field

from particleseg_assets.assets.model import segmentation_model
from particleseg_assets.bridge import LaunchpadConfig
from particleseg_assets.resources import StorageResource
from particleseg_model.cleaning.clean import clean_to_folder
from particleseg_model.figures import markdown_image


class CleanConfig(LaunchpadConfig):
    star: str = ""
    """The RELION particle STAR file to clean (3.0, 3.1 or 5.0), an absolute path; it is never
    modified. Required: a run without it stops at once, saying so."""
    model_version: str = ""
    """A registered version ("v0002" or "2"); empty: the latest."""
    drop: float = 0.3
    """Fraction of the readable particles to drop, the lowest scores first (the paper: 0.3)."""
    keep_above: float | None = None
    """Keep the particles scoring above this instead of dropping a fraction."""
    score: str = "centred"
    """"centred" (the signal probability at the box centre: drops empty and off-centre picks;
    the default, best on real and simulated particles), "ets" (the paper's edge-to-signal
    ratio) or "calibrated" (also drops too-high ETS and atypical signal areas)."""
    particles_dir: str = ""
    """Where the stacks' paths start (empty: the STAR file's folder)."""
    on_bad: str = "skip"
    """Rows whose image is missing or unreadable: "skip" (dropped and counted) or "stop"."""
    name: str = ""
    """Output folder under $PARTICLESEG_DATA/cleaned (empty: the STAR file's stem)."""
    classify: int = Field(
        default=0,
        description="Then 2D-classify (RELION relion_refine) the input, the cleaned set and a "
        "random drop of the same size into this many classes, same parameters: the class "
        "averages side by side (0: no classification)",
    )
    classify_iterations: int = Field(
        default=25, description="RELION --iter of the 2D classifications"
    )
    classify_threads: int = Field(default=2, description="RELION --j of the 2D classifications")


@asset(group_name="cleaning", deps=[segmentation_model], kinds={"keras", "star"}, pool="train")
def cleaned_particles(
    context: AssetExecutionContext, config: CleanConfig, storage: StorageResource
) -> MaterializeResult:
    """A user's particle STAR file segmented by the model, every particle scored (ETS or the
    calibrated score), the lowest dropped, and the cleaned STAR written in the input's RELION
    version with every column and the optics table, beside the score table of all particles,
    the score histogram with the cut and a gallery of low, median and high scores."""
    if not config.star.strip():
        raise ValueError(
            "clean_job needs the STAR file to clean: set ops.cleaned_particles.config.star "
            "(an absolute path) in the launchpad"
        )
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
    classified = _classify(context, config, star, result) if config.classify > 0 else {}
    return MaterializeResult(
        metadata={
            **classified,
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


def _classify(context: AssetExecutionContext, config: CleanConfig, star: Path, result) -> dict:
    """``classify`` > 0: the 2D classifications before, after and after a random drop
    (:func:`particleseg_model.cleaning.compare.classify_before_after`) into the cleaning's
    folder; their galleries and summary table as metadata."""
    import pandas as pd

    from particleseg_model.cleaning.compare import classify_before_after

    keep = pd.read_parquet(result.scores_path)["keep"].to_numpy(dtype=bool)
    comparison = classify_before_after(
        star,
        keep,
        result.out.parent / "classify",
        classes=config.classify,
        iterations=config.classify_iterations,
        threads=config.classify_threads,
        particles_dir=config.particles_dir or None,
        overwrite=True,
        log=context.log.info,
    )
    ratios = comparison.ratios()
    return {
        "class_averages": MetadataValue.md(
            markdown_image(comparison.gallery, "2D class averages before, after, random drop")
        ),
        "class_averages_png": MetadataValue.path(str(comparison.gallery)),
        "classification_summary": MetadataValue.md(
            comparison.table.to_markdown(index=False)
            if _has_tabulate()
            else "```\n" + comparison.table.to_string(index=False) + "\n```"
        ),
        **{f"good_class_ratio_{k}": round(v, 3) for k, v in ratios.items()},
    }


def _has_tabulate() -> bool:
    try:
        import tabulate  # noqa: F401
    except ImportError:
        return False
    return True
