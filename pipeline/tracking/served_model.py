"""The served model as MLflow *models from code*: `log_generation_model` logs this file, and MLflow runs it to build
the model when it logs, loads or serves it, so the logged model holds code and weights, never a pickled object.
Its imports come from the code paths logged beside it (`model/`, `tokenization/`, `pipeline/`)."""

import mlflow

from pipeline.tracking.models import GenerationModel

mlflow.models.set_model(GenerationModel())
