"""Names of the files and folders a job leaves in DATA_DIR: one contract for the trainer that writes them
and the services and routes that read them.

DATA_DIR/jobs/<job id>/adapter/            the trained LoRA adapter (its existence marks training done)
                       adapter/intent_tuner.json   system prompt, label set, recipe, metrics, loss history
                       adapter/loss_curve.png
                       checkpoints/checkpoint-<step>/   resumable state, removed once the job succeeded
                       launch/             the training process's run (app.services.training_process):
                                           spec.json, stop, outcome.json, error-rank<r>.json, failures.json
                       .training.lock      held by the training process (rank 0) while it runs
DATA_DIR/reports/<report id>/results.json, error_predictions.json, failed_predictions.json,
                             detailed_analysis.json, confusion_matrix.png,
                             reliability_diagram.png (score mode: the probabilities' calibration)
"""

ADAPTER_DIRNAME = "adapter"
CHECKPOINTS_DIRNAME = "checkpoints"
CHECKPOINT_PREFIX = "checkpoint-"
ADAPTER_METADATA_FILENAME = "intent_tuner.json"
LOSS_CURVE_FILENAME = "loss_curve.png"
LAUNCH_DIRNAME = "launch"
TRAINING_LOCK_FILENAME = ".training.lock"

REPORT_RESULTS_FILENAME = "results.json"
REPORT_ERRORS_FILENAME = "error_predictions.json"
REPORT_FAILED_FILENAME = "failed_predictions.json"
REPORT_DETAIL_FILENAME = "detailed_analysis.json"
CONFUSION_MATRIX_FILENAME = "confusion_matrix.png"
RELIABILITY_DIAGRAM_FILENAME = "reliability_diagram.png"
