"""The segmentation model (trained on every ``particle_masks`` partition, versioned under
``$PARTICLESEG_DATA/models``; see particleseg_model.model.versions) and its IoU reports."""

from typing import Any

from dagster import AssetExecutionContext, MaterializeResult, MetadataValue, asset

from particleseg_assets.assets.corpus import particle_masks
from particleseg_assets.bridge import LaunchpadConfig
from particleseg_assets.partitions import empiar_partitions
from particleseg_assets.resources import StorageResource
from particleseg_model.figures import markdown_image
from particleseg_model.model.registry import latest_model
from particleseg_model.model.versions import (
    evaluate_report,
    markdown_table,
    train_and_register,
    train_config,
)


class ModelConfig(LaunchpadConfig):
    mode: str = "auto"
    """"auto": incremental from the latest version when partitions were added (same
    architecture and size), else from scratch; "incremental" or "full" to force one;
    "pretrained": fine-tune the model shipped in the package (set arch and size to its own)."""
    partitions: list[str] = []
    """Train on these partitions; empty: every partition in the corpus but the held-out ones."""
    holdout: list[str] = []
    """Partitions never trained on: evaluated as unseen datasets (an unseen map)."""
    arch: str = "custom"
    """The U-Net: "custom" (the paper's) or a keras.applications encoder name."""
    size: int = 64
    """Model input in pixels (the paper: 256); every particle is resized to it."""
    base_filters: int = 16
    """Filters of the first convolution block (doubled at each level down)."""
    weights: str = ""
    """Local ImageNet weights of a keras.applications encoder (empty: from scratch)."""
    optimizer: str = "rmsprop"
    """"rmsprop" (the paper's) or "adam"."""
    learning_rate: float = 1e-3
    """The optimizer's learning rate."""
    batch_size: int = 16
    """Images per training step (the global batch when distributed)."""
    epochs: int = 30
    """At most this many epochs (early stopping ends sooner)."""
    patience: int = 3
    """Early stopping: epochs without a lower validation loss before stopping (the paper: 3)."""
    seed: int = 0
    """Seed of the weights' initialisation and of the batches' order."""
    replay: float = 0.5
    """Incremental training: old-partition particles per new one in every batch."""
    max_train_particles: int = 0
    """Use at most this many train particles per epoch (0: all); for quick runs."""
    junk: str = "background"
    """Particles the corpus knows to be junk (simulated ground truth): "background" (kept with
    an all-background label), "drop" or "keep" (as labelled)."""
    distribute: str = "default"
    """tf.distribute strategy: "default" (none), "mirrored" (one replica per GPU of the node;
    ``batch_size`` is the global batch), "one_device", or "multi_worker" (TF_CONFIG names the
    hosts, each running the same training)."""


def _train_config(config: ModelConfig):
    """The library's TrainConfig from the launchpad fields of the same names."""
    return train_config(config.model_dump())


# The training pod under the k8s_job_executor: one GPU (a run's per_step_k8s_config can raise it
# for MirroredStrategy) and the toleration GPU node pools' taint needs. Other executors ignore it.
TRAIN_K8S_CONFIG: dict[str, Any] = {
    "container_config": {"resources": {"limits": {"nvidia.com/gpu": 1}}},
    "pod_spec_config": {
        "tolerations": [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    },
}


@asset(
    group_name="model",
    deps=[particle_masks],
    kinds={"keras", "tensorflow"},
    pool="train",
    op_tags={"dagster-k8s/config": TRAIN_K8S_CONFIG},
)
def segmentation_model(
    context: AssetExecutionContext, config: ModelConfig, storage: StorageResource
) -> MaterializeResult:
    """The particleSeg U-Net, trained on the train split of every corpus partition (early
    stopping on the validation split), registered as a new version in the model registry.
    Partitions added since the latest version are learnt incrementally (from the latest, with
    replay of the old partitions); the report says how the IoU on the old ones moved. A failed
    training never replaces the latest registered model."""
    done = train_and_register(
        storage.corpus_root(),  # local paths or URLs (object storage)
        storage.models_root(),
        _train_config(config),
        partitions=config.partitions,
        holdout=config.holdout,
        mode=config.mode,
        settings=config.model_dump(),
        run_id=context.run.run_id,
        log=context.log.info,
    )
    metadata: dict[str, Any] = {
        **done.summary(),
        "iou_table": MetadataValue.md(markdown_table(done.rows)),
        "model": MetadataValue.path(done.version.model_location),
        "training_curve": MetadataValue.md(markdown_image(done.curve_png, "training curve")),
    }
    if done.overlay_png is not None:
        metadata["test_overlay"] = MetadataValue.md(
            markdown_image(done.overlay_png, "particle / true mask / predicted mask")
        )
    return MaterializeResult(metadata=metadata)


@asset(
    partitions_def=empiar_partitions,
    group_name="model",
    deps=[segmentation_model, particle_masks],
    kinds={"keras", "json"},
)
def iou_reports(context: AssetExecutionContext, storage: StorageResource) -> MaterializeResult:
    """The latest model on this dataset's test split: the paper's mean IoU (one confusion
    matrix over every pixel, IoU per class, mean of the three), per-class IoU, pixel accuracy,
    whether the model saw the dataset in training, and particles beside their true and
    predicted masks."""
    key, models_root = context.partition_key, storage.models_root()
    if (version := latest_model(models_root)) is None:
        raise FileNotFoundError(
            f"no model registered under {models_root}: materialize segmentation_model first"
        )
    done = evaluate_report(version, storage.corpus_root(), key, storage.path("iou_reports", key))
    return MaterializeResult(
        metadata={
            **done.summary(),
            "report": MetadataValue.path(str(done.report_path)),
            "overlay": MetadataValue.md(
                markdown_image(done.overlay_path, "particle / true / predicted")
            ),
        }
    )
