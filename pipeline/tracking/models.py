"""A trained model as an MLflow pyfunc model: log it (optionally register it), then serve it with `mlflow models serve`.

`log_generation_model` attaches the train folder's `model.safetensors`,
`model.json` and `tokenizer.json` to an existing run as a pyfunc model whose
`predict` takes a DataFrame (or a dict of columns) with a `prompt` column and
optional `max_new_tokens` and `temperature` columns, and returns one completion
per row. Logged with an `index` stage folder (by `decode`, when it retrieves),
the model also retrieves: each prompt gets its top-k passages in front (an
optional `retrieve` column sets k per row, 0 for none; by default the k decode
used), and each row's prediction is `{"completion": ..., "sources": [...]}`
with the passages it cited. An encoder's model fills masks instead: each `prompt`
holds the mask token, and each row's prediction is `{"completion": the prompt
filled in, "predictions": the top-k tokens with probabilities at each mask}`.
It is logged as MLflow's *models from code*: the
logged model holds the file `served_model.py`, which MLflow runs to build a `GenerationModel`, so loading
or serving it unpickles nothing. A request may ask for at most
`max_new_tokens_limit` new tokens per row (set when it is logged; by default the
model's context), so one request cannot make the server allocate an unbounded KV
cache. The model carries its own code (`model/`, `tokenization/`, `pipeline/` as code paths)
and needs only torch, tokenizers and safetensors to run, so a server started with
`mlflow models serve -m <uri> --env-manager local --host 127.0.0.1` loads it
without the rest of the pipeline. Like everything that speaks to MLflow it lives in
`pipeline.tracking`; the pyfunc flavour needs MLflow's own model logging.
"""

from __future__ import annotations

import json
import os
import shutil
import tempfile
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import mlflow.pyfunc
import pandas as pd
from mlflow.exceptions import MlflowException

from pipeline.artifacts import MODEL_FILES
from tokenization.bpe import EOS
from tokenization.masking import MASK

_REPO = Path(__file__).resolve().parents[2]
_MODEL_CODE = Path(__file__).with_name("served_model.py")  # what MLflow runs to build the served model


class GenerationModel(mlflow.pyfunc.PythonModel):
    """prompt (+ optional max_new_tokens, temperature) -> completion, with the KV-cache sampler."""

    def load_context(self, context: Any) -> None:
        import torch
        from tokenizers import Tokenizer

        from model import load_model

        paths = {name: Path(context.artifacts[name]) for name in MODEL_FILES}
        folder = paths["model.json"].parent
        if any(p.parent != folder or p.name != name for name, p in paths.items()):  # load_model wants one folder
            folder = Path(tempfile.mkdtemp(prefix="llmpipe-model-"))
            for name, p in paths.items():
                shutil.copyfile(p, folder / name)
        self.model, _ = load_model(folder, device="cuda" if torch.cuda.is_available() else "cpu")
        self.tokenizer = Tokenizer.from_file(str(paths["tokenizer.json"]))
        limit = self.model.config.max_seq_len  # models logged without a limit: the context
        self.settings = {**_defaults(limit), "max_new_tokens_limit": limit, **(context.model_config or {})}
        self.retriever = None
        if "index" in context.artifacts:  # logged by decode with its index: the served model retrieves too
            from pipeline.rag import open_retriever

            self.retriever = open_retriever(context.artifacts["index"], self.model, self.tokenizer)

    def predict(self, context: Any, model_input: pd.DataFrame, params: dict[str, Any] | None = None) -> list[Any]:
        """model_input: a DataFrame or a dict of columns with `prompt` (+ optional max_new_tokens, temperature,
        and retrieve where the model retrieves) -> one completion (str) per row; where the model retrieves,
        `{"completion": str, "sources": [{passage_id, file, line, score}, ...]}` per row. A DataFrame hint is one
        MLflow infers no schema from: the logged signature stays the one `_signature` declares."""
        from model.generation import SamplingOptions
        from pipeline.rag import complete_with_retrieval

        df = model_input if isinstance(model_input, pd.DataFrame) else pd.DataFrame(model_input)
        if "prompt" not in df.columns:
            raise MlflowException.invalid_parameter_value(f"input needs a 'prompt' column, got {list(df.columns)}")
        s = self.settings
        if self.model.config.family == "encoder":
            return self._fill(df)
        groups: dict[tuple[int, float, int], list[int]] = {}  # rows with the same options decode as one batch
        for i, row in enumerate(df.to_dict("records")):
            key = self._row_options(i, row)
            groups.setdefault(key, []).append(i)
        prompts = [str(p) for p in df["prompt"]]
        out: list[Any] = [""] * len(prompts)
        for (n, t, k), rows in groups.items():
            opts = SamplingOptions(max_new_tokens=n, temperature=t, top_k=s["top_k"], seed=None)
            if self.model.config.family == "encoder-decoder":  # the prompt is the source; the answer, the target
                from pipeline.completion import transduce

                for i, r in zip(rows, transduce(self.model, self.tokenizer, [prompts[i] for i in rows], opts,
                                                eos_token=s["eos_token"])):
                    out[i] = r["completion"]
                continue
            done = complete_with_retrieval(self.model, self.tokenizer, self.retriever, [prompts[i] for i in rows], opts,
                                           k=k, eos_token=s["eos_token"], key="retrieve")  # k 0: no passages
            for i, r in zip(rows, done):
                out[i] = r["completion"] if self.retriever is None else {"completion": r["completion"],
                                                                          "sources": r.get("sources", [])}
        return out

    def _fill(self, df: pd.DataFrame) -> list[dict[str, Any]]:
        """An encoder's answer: each prompt's masks filled in, with the top-k candidates at each."""
        from pipeline.completion import fill_masks

        try:
            rows = fill_masks(self.model, self.tokenizer, [str(p) for p in df["prompt"]],
                              mask_token=self.settings["mask_token"], top_k=int(self.settings["top_k"] or 5))
        except ValueError as e:
            raise MlflowException.invalid_parameter_value(str(e)) from None
        return [{"completion": r["completion"], "predictions": r["predictions"]} for r in rows]

    def _row_options(self, i: int, row: dict[str, Any]) -> tuple[int, float, int]:
        """(max_new_tokens, temperature, retrieve) of row i, the settings where it leaves one out; refused out of
        bounds, and a `retrieve` refused where the model holds no index."""
        s = self.settings
        n, t, k = row.get("max_new_tokens"), row.get("temperature"), row.get("retrieve")
        n = int(n) if pd.notna(n) else int(s["max_new_tokens"])
        t = float(t) if pd.notna(t) else float(s["temperature"])
        if self.retriever is None and pd.notna(k) and int(k) != 0:
            raise MlflowException.invalid_parameter_value(
                f"row {i}: retrieve {int(k)}: this model holds no index (the one decode logs with its index does)")
        k = (int(k) if pd.notna(k) else int(s.get("retrieve") or 0)) if self.retriever is not None else 0
        if n < 1 or t < 0 or k < 0:
            raise MlflowException.invalid_parameter_value(
                f"row {i}: max_new_tokens must be >= 1, temperature >= 0 and retrieve >= 0, got {(n, t, k)}")
        if k > len(self.retriever or ()):
            raise MlflowException.invalid_parameter_value(
                f"row {i}: retrieve {k} exceeds the {len(self.retriever)} passages of this model's index")
        if n > s["max_new_tokens_limit"]:
            raise MlflowException.invalid_parameter_value(
                f"row {i}: max_new_tokens {n} exceeds this model's limit of {s['max_new_tokens_limit']} "
                "(max_new_tokens_limit, set when the model was logged)")
        return n, t, k


def _defaults(limit: int | None = None) -> dict[str, Any]:
    """The served model's sampling defaults: those of `SamplingOptions`, declared there once (a row that leaves
    max_new_tokens out gets at most the limit)."""
    from model.generation import SamplingOptions

    d = SamplingOptions()
    n = d.max_new_tokens if limit is None else min(d.max_new_tokens, limit)
    return {"max_new_tokens": n, "temperature": d.temperature, "top_k": d.top_k}


def _signature(*, retrieves: bool = False) -> Any:
    from mlflow.models import ModelSignature
    from mlflow.types import ColSpec, DataType, Schema
    from mlflow.types.schema import AnyType

    # The options are typed `any`: a row that leaves one out turns its column into floats with NaN (which a long
    # column refuses) while a request that gives every row an integer makes it int64 (which a double column
    # refuses). `predict` converts and checks them.
    # `retrieve` is declared on a model without an index too, so a request that asks for it is refused, not dropped
    options = [ColSpec(AnyType(), name, required=False) for name in ("max_new_tokens", "temperature", "retrieve")]
    return ModelSignature(inputs=Schema([ColSpec(DataType.string, "prompt"), *options]),
                          outputs=Schema([ColSpec(AnyType() if retrieves else DataType.string)]))


def log_generation_model(tracking_uri: str, run_id: str, model_dir: Path, *, registered_name: str | None = None,
                         eos_token: str = EOS, max_new_tokens_limit: int | None = None,
                         index_dir: Path | None = None, retrieve: int | None = None, mask_token: str = MASK) -> str:
    """Log the model in `model_dir` (a train folder) to the existing run `run_id` as a pyfunc model named "model";
    register it as `registered_name` when given. Returns the model URI (`models:/<name>/<version>` when registered).
    A request may ask for at most `max_new_tokens_limit` new tokens per row (default: the model's context).
    With `index_dir` (an `index` stage folder) the model carries the index and retrieves `retrieve` passages per
    prompt by default. An encoder's model fills `mask_token`s. The run keeps its status: a RUNNING run (a stage
    still in progress) is left RUNNING."""
    from mlflow.tracking import MlflowClient

    model_dir = Path(model_dir)
    missing = [f for f in MODEL_FILES if not (model_dir / f).is_file()]
    if missing:
        raise FileNotFoundError(f"{model_dir}: missing {', '.join(missing)}")
    model_config = json.loads((model_dir / "model.json").read_text(encoding="utf-8"))["model_config"]
    encoder = model_config.get("family", "decoder") == "encoder"
    if max_new_tokens_limit is None:
        max_new_tokens_limit = model_config["max_seq_len"]
    if max_new_tokens_limit < 1:
        raise ValueError(f"max_new_tokens_limit must be >= 1, got {max_new_tokens_limit}")
    artifacts = {f: str(model_dir / f) for f in MODEL_FILES}
    settings = {"eos_token": eos_token, **_defaults(int(max_new_tokens_limit)), "max_new_tokens_limit": int(max_new_tokens_limit)}
    if index_dir is not None:
        artifacts["index"] = str(index_dir)
        settings["retrieve"] = int(retrieve or 1)
    if encoder:
        settings["mask_token"] = mask_token
    client = MlflowClient(tracking_uri)
    status = client.get_run(run_id).info.status
    with _fluent_tracking_uri(tracking_uri), mlflow.start_run(run_id=run_id):
        info = mlflow.pyfunc.log_model(
            name="model", python_model=str(_MODEL_CODE), artifacts=artifacts,
            code_paths=[str(_REPO / "model"), str(_REPO / "tokenization"), str(_REPO / "pipeline")],
            signature=_signature(retrieves=index_dir is not None or encoder),
            # also checks at logging time that it predicts
            input_example={"prompt": [mask_token]} if encoder else {"prompt": ["\n"], "max_new_tokens": [1]},
            model_config=settings, pip_requirements=["torch", "tokenizers", "safetensors", "numpy", "pandas",
                                                     *(("pyarrow", "bm25s", "faiss-cpu") if index_dir else ())])
    uri = info.model_uri
    if registered_name:
        with _fluent_tracking_uri(tracking_uri):
            uri = f"models:/{registered_name}/{mlflow.register_model(uri, registered_name).version}"
    if status == "RUNNING":  # leaving start_run ended the run; its owner (the workflow) ends it
        client.update_run(run_id, status="RUNNING")
    return uri


@contextmanager
def _fluent_tracking_uri(uri: str) -> Iterator[None]:
    """Point MLflow's fluent API (the only way to log a pyfunc model) at `uri`, then restore what was there:
    `set_tracking_uri` also writes MLFLOW_TRACKING_URI, so both the global and the variable are put back."""
    from mlflow.tracking._tracking_service import utils

    old_global, old_env = getattr(utils, "_tracking_uri", None), os.environ.get("MLFLOW_TRACKING_URI")
    mlflow.set_tracking_uri(uri)
    try:
        yield
    finally:
        mlflow.set_tracking_uri(old_global)
        if old_env is None:
            os.environ.pop("MLFLOW_TRACKING_URI", None)
        else:
            os.environ["MLFLOW_TRACKING_URI"] = old_env
