"""Training: optimisers, metrics, the ``fit`` loop, checkpoints, sharding and logs.

- ``OptimizerConfig``, ``make_optimizer``, ``learning_rate_schedule``, ``count_params``,
  ...: optax optimisers from a frozen config.
- ``accuracy``, ``precision_recall_f1``, ``mae``, ...: metrics: pure functions with a
  ``valid`` mask.
- ``fit``, ``FitResult``, ``evaluate``, ``predict``: the training loop (exact resume,
  early stop) over any ``lepton_mm.data.BatchSource``.
- ``seed_rngs``: model init from one seed.
- ``ArrayDataset``, ``epoch_permutation``: re-exported from ``lepton_mm.data`` (where the
  batch sources live) for older imports.
- ``Checkpointer``, ``load_model``, ...: Orbax checkpoints.
- ``make_mesh``, ``initialize_distributed``, ...: data parallelism, multi-host start-up.
- ``JsonlLogger``, ``read_log``, ``plot_curves``: ``log.jsonl`` and ``curves.png``.
- ``Logger``, ``TensorBoardLogger``, ``WandbLogger``, ``MlflowLogger``, ``LOGGERS``,
  ``scalar_metrics``: where ``fit(loggers=...)`` sends the same records (optional
  extras).
"""

from lepton_mm.metrics import (
    accuracy,
    confusion_matrix,
    mae,
    mosi_acc2,
    mosi_acc7,
    mosi_f1,
    multilabel_f1,
    pearson,
    precision_recall_f1,
    recall_at_k,
)
from lepton_mm.training.allocator import (
    release_free_memory,
    release_memory_after_compiles,
    tune_glibc_malloc,
)
from lepton_mm.training.checkpoint import (
    CheckpointCorruptError,
    Checkpointer,
    CheckpointMismatchError,
    load_model,
    model_fingerprint,
)
from lepton_mm.training.loggers import (
    LOGGERS,
    Logger,
    MlflowLogger,
    TensorBoardLogger,
    WandbLogger,
    scalar_metrics,
)
from lepton_mm.training.logging import JsonlLogger, plot_curves, read_log
from lepton_mm.training.loop import (
    ArrayDataset,
    FitResult,
    TrainState,
    epoch_permutation,
    evaluate,
    fit,
    make_eval_step,
    make_train_step,
    predict,
    seed_rngs,
)
from lepton_mm.training.optim import (
    DEFAULT_NO_DECAY,
    OPTIMIZERS,
    SCHEDULES,
    OptimizerConfig,
    count_params,
    learning_rate_schedule,
    make_optimizer,
    param_path,
    trainable_mask,
)
from lepton_mm.training.sharding import (
    data_sharding,
    initialize_distributed,
    make_mesh,
    replicated,
    shard_batch,
)

__all__ = [
    "DEFAULT_NO_DECAY",
    "LOGGERS",
    "OPTIMIZERS",
    "SCHEDULES",
    "ArrayDataset",
    "CheckpointCorruptError",
    "CheckpointMismatchError",
    "Checkpointer",
    "FitResult",
    "JsonlLogger",
    "Logger",
    "MlflowLogger",
    "OptimizerConfig",
    "TensorBoardLogger",
    "TrainState",
    "WandbLogger",
    "accuracy",
    "confusion_matrix",
    "count_params",
    "data_sharding",
    "epoch_permutation",
    "evaluate",
    "fit",
    "initialize_distributed",
    "learning_rate_schedule",
    "load_model",
    "mae",
    "make_eval_step",
    "make_mesh",
    "make_optimizer",
    "make_train_step",
    "model_fingerprint",
    "mosi_acc2",
    "mosi_acc7",
    "mosi_f1",
    "multilabel_f1",
    "param_path",
    "pearson",
    "plot_curves",
    "precision_recall_f1",
    "predict",
    "read_log",
    "recall_at_k",
    "release_free_memory",
    "release_memory_after_compiles",
    "replicated",
    "scalar_metrics",
    "seed_rngs",
    "shard_batch",
    "trainable_mask",
    "tune_glibc_malloc",
]
