"""The pipeline: config, workflow engine, artifact store, MLflow tracking, CLI and stages.
The only package that knows Ray, DeepSpeed and MLflow."""
