"""Stage `tasks` (optional): multiple-choice and cloze accuracy of the trained model, beside perplexity.

It runs when the config has a `tasks:` section. Each task is a local JSON Lines
file in lm-evaluation-harness's shapes; the scoring is `model.tasks` (see there
for the conventions, which are lm_eval's, so the numbers equal `lm_eval`'s on
the exported Hugging Face folder). The files are read and every record checked
when the plan is made, so a bad record stops the run before any work, as one
line naming file:line; their content (sha256), not their path, enters the
fingerprint, so editing a task file reruns this stage and nothing else. The
questions travel to one Ray task (a GPU one when the cluster has GPUs), which
opens the model on its node and scores them. Writes `tasks.json` (metrics and
one row per record) and logs `tasks/<name>/<metric>` to MLflow; its committed
line shows each task's acc and chance first, and `llmpipe run` ends with one
line per task (accuracy ± standard error against chance, `pipeline.cli`).
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path
from typing import Any

from model.tasks import Question, TaskFormatError, read_questions, score_task
from pipeline.artifacts import MODEL_FILES
from pipeline.cluster.resources import task_options
from pipeline.engine.stage import Stage, StageContext
from pipeline.engine.store import StageRef
from pipeline.errors import ConfigError
from pipeline.fingerprints import as_dict
from pipeline.schema import Config, TaskSpec
from tokenization.inputs import InputError

METRICS = ("acc", "chance", "acc_stderr", "acc_norm", "acc_norm_stderr", "ppl", "n")  # the order metrics are shown in


def load_task(spec: TaskSpec, index: int) -> tuple[str, list[Question]]:
    """(the file's sha256, its questions): a missing file is a ConfigError naming the key, a bad record an
    InputError naming file:line."""
    path = Path(spec.path).expanduser()
    if not path.is_file():
        raise ConfigError(f"tasks.suite[{index}].path: {path} not found")
    data = path.read_bytes()
    try:
        text = data.decode("utf-8-sig")
    except UnicodeDecodeError as e:
        raise InputError(f"{path}: not UTF-8 text (byte {e.start})") from None
    try:
        questions = read_questions(text.splitlines(), spec.kind, source=str(path), limit=spec.limit)
    except TaskFormatError as e:
        raise InputError(str(e)) from None
    return hashlib.sha256(data).hexdigest(), questions


def _section(cfg: Config) -> dict[str, Any]:
    """Each task's name, kind, limit and file content hash (the path is not: a moved file is the same task)."""
    assert cfg.tasks is not None
    return {"suite": [{"name": t.name, "kind": t.kind, "limit": t.limit, "sha256": load_task(t, i)[0]}
                      for i, t in enumerate(cfg.tasks.suite)]}


def score_tasks(model_dir: str, tasks: list[tuple[str, str, list[Question]]], *, batch_size: int) -> dict[str, Any]:
    """The stage's work as a plain function (no Ray): name -> {kind, metrics, records} for each (name, kind,
    questions)."""
    import torch

    from model import load_model
    from tokenization.bpe import load_tokenizer

    model, _ = load_model(model_dir, device="cuda" if torch.cuda.is_available() else "cpu")
    tok = load_tokenizer(f"{model_dir}/tokenizer.json")

    def encode(text: str) -> list[int]:
        return tok.encode(text).ids  # as lm_eval's tokenizer call: default special tokens (ours adds none)

    out = {}
    for name, kind, questions in tasks:
        try:
            out[name] = {"kind": kind, **score_task(model, encode, questions, kind, source=f"tasks {name}",
                                                    batch_size=batch_size)}
        except TaskFormatError as e:
            raise InputError(str(e)) from None
    return out


def _tasks_task(train: StageRef, **kw: Any) -> dict[str, Any]:
    """On the task's node: open the model there, then score."""
    return score_tasks(str(train.local(list(MODEL_FILES))), **kw)


def flat_metrics(result: dict[str, Any]) -> dict[str, float]:
    """`tasks/<name>/<metric>`: every task's acc and chance first (the committed line shows the first few)."""
    ordered = sorted(((METRICS.index(m), name, m) for name, r in result.items() for m in r["metrics"]))
    return {f"tasks/{name}/{m}": result[name]["metrics"][m] for _, name, m in ordered}


def run(ctx: StageContext) -> dict[str, float]:
    import ray

    cfg = ctx.config
    assert cfg.tasks is not None
    tasks = []
    for i, (spec, planned) in enumerate(zip(cfg.tasks.suite, ctx.section["suite"])):
        sha, questions = load_task(spec, i)
        if sha != planned["sha256"]:  # the folder must hold what its fingerprint says
            raise InputError(f"{spec.path}: changed since the run was planned; run again")
        tasks.append((spec.name, spec.kind, questions))
    ctx.progress.update(status=f"{len(tasks)} task(s), {sum(len(q) for *_, q in tasks)} records (one Ray task)")
    remote = ray.remote(_tasks_task).options(**task_options(cfg.resources.tasks, "tasks"))
    result = ray.get(remote.remote(ctx.inputs["train"].ref, tasks=tasks, batch_size=cfg.tasks.batch_size))
    (ctx.out_dir / "tasks.json").write_text(json.dumps(result, indent=1))
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "tasks.json")
    return flat_metrics(result)  # `llmpipe run` ends with a line per task, cached or not


STAGE = Stage(name="tasks", needs=("tokenizer", "train"), section=_section, version=1, run=run,
              input_context="evaluation", main_input="train", enabled=lambda cfg: cfg.tasks is not None,
              params=lambda cfg: as_dict(cfg.tasks) if cfg.tasks is not None else {})
