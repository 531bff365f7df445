"""The pipeline: config, workflow engine (engine/), stages (stages/), MLflow (tracking/), Ray and the cluster (cluster/), CLI.
The only package that knows Ray, DeepSpeed and MLflow."""
