"""The segmentation model: networks, the corpus loader, training, prediction, the calibrated score,
metrics and the versioned registry."""

from __future__ import annotations

from particleseg_model.model.calibration import (
    calibrated_scores,
    fit_calibration,
    mask_calibration,
    mask_features,
)
from particleseg_model.model.loader import (
    CorpusBatches,
    corpus_pydataset,
    corpus_tf_dataset,
)
from particleseg_model.model.metrics import (
    ConfusionAccumulator,
    confusion_matrix,
    edge_to_signal,
    iou_scores,
    per_particle_iou,
)
from particleseg_model.model.predict import (
    predict_labels,
    predict_probabilities,
)
from particleseg_model.model.registry import (
    ModelError,
    ModelVersion,
    cache_dir,
    get_model,
    latest_model,
    list_models,
    load_model,
    register_model,
    resolve_model,
    staging_dir,
)
from particleseg_model.model.train import (
    Evaluation,
    TrainConfig,
    TrainResult,
    evaluate_partition,
    make_strategy,
    train_segmentation,
    training_curve_png,
)
from particleseg_model.model.unet import (
    ARCHITECTURES,
    SKIP_LAYERS,
    build_unet,
    count_parameters,
    model_input_size,
)

__all__ = [
    "ARCHITECTURES",
    "ConfusionAccumulator",
    "CorpusBatches",
    "Evaluation",
    "ModelError",
    "ModelVersion",
    "SKIP_LAYERS",
    "TrainConfig",
    "TrainResult",
    "build_unet",
    "cache_dir",
    "calibrated_scores",
    "confusion_matrix",
    "corpus_pydataset",
    "corpus_tf_dataset",
    "count_parameters",
    "edge_to_signal",
    "evaluate_partition",
    "fit_calibration",
    "get_model",
    "iou_scores",
    "latest_model",
    "list_models",
    "load_model",
    "make_strategy",
    "mask_calibration",
    "mask_features",
    "model_input_size",
    "per_particle_iou",
    "predict_labels",
    "predict_probabilities",
    "register_model",
    "resolve_model",
    "staging_dir",
    "train_segmentation",
    "training_curve_png",
]
