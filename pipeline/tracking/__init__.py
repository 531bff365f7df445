"""Everything that speaks to MLflow, and nothing else does: the runs of an invocation (`mlflow`), outage-proof calls
(`outbox`), secret redaction (`redact`), the trained model as a servable pyfunc (`models`), from a folder or run
id to a model (`lookup`) and evaluation runs side by side (`compare`)."""
