"""Stage `train`: a DeepSpeed ZeRO job launched by Ray Train's `TorchTrainer`.

The driver only builds the trainer: `ScalingConfig` from `train.num_workers`
(GPUs when the cluster has them), `RunConfig(storage_path=<stage folder>,
failure_config=FailureConfig(max_failures))`. Each rank's checkpoint files land
in `<stage folder>/ray_train/step_NNNNNNNN/` with a marker per rank; a worker
failure or a rerun of this stage after a crash resumes from the newest
checkpoint that verifies (see `checkpoints`; the folder is kept because the
stage is resumable). The final checkpoint carries the consolidated
`model.safetensors` + `model.json`, copied to the top of the stage folder with
the tokenizer, which is all `evaluate` and `decode` need (with `train.lora` the
weights are merged and the adapter comes beside them: see `lora`); the final metrics are
read from its `train_state.json`, so a rerun that resumes from the final
checkpoint (killed after training, before the commit) commits them too.

The fingerprint section holds the model and the `train` fields that change the
weights, with `train.precision` replaced by what it resolves to and the device
kind beside it (`hardware` says how they are resolved on the driver, before Ray
starts), so a model trained in fp32 on CPUs is never reused for a bf16 GPU run.
`train.num_workers` stays out: the workers see the same samples and schedule,
and the result is equal up to floating-point reduction order. `train.lora` enters
only when set (full fine-tuning keeps the fingerprints it had before LoRA); with
LoRA, `init_from`'s identity is there as for any fine-tuning.
"""

from __future__ import annotations

import json
import shutil
import time
from dataclasses import asdict
from pathlib import Path
from typing import Any

from pipeline import faults
from pipeline.cluster.resources import train_scaling
from pipeline.engine.stage import Stage, StageContext
from pipeline.errors import ConfigError, TrainingError, UserError, user_cause
from pipeline.fingerprints import as_dict, fingerprint_view
from pipeline.objectives import objective_ids
from pipeline.schema import Config
from pipeline.stages.train.checkpoints import check_resume_layout, verify_checkpoint
from pipeline.stages.train.hardware import TrainHardware, resolve_hardware
from pipeline.stages.train.init_from import (
    check_init_compatible,
    init_config,
    init_identity,
)
from pipeline.stages.train.lora import ADAPTER_FILES, check_lora_targets
from pipeline.stages.train.progress import forward_progress
from pipeline.stages.train.worker import STATE, train_loop_per_worker
from tokenization.mixture import realised_shares


def model_dict(cfg: Config, vocab_size: int) -> dict[str, Any]:
    return {**cfg.model.model_config_fields(), "vocab_size": vocab_size}


# Train fields added after models were trained without them, with the value that reproduces those models.
_LATER_DEFAULTS = {"packing": "stream", "compile": False, "lora": None}  # lora None: full fine-tuning
# the model every config meant before families (n_decoder_layer: only an encoder-decoder has a decoder stack)
_MODEL_LATER_DEFAULTS = {"family": "decoder", "norm_position": "pre", "n_decoder_layer": None, "rel_buckets": 32,
                         "rel_max_distance": 128, "scale_attention": True, "memory_len": 0}


def section_for(cfg: Config, hw: TrainHardware) -> dict[str, Any]:
    """What changes the weights: the model, the train fields, and the precision and device kind they train in."""
    train = {**fingerprint_view(cfg.train), "precision": hw.precision, "device": hw.device}
    for key, default in _LATER_DEFAULTS.items():  # options added later: at their default, the fingerprint as before
        if train.get(key) == default:
            del train[key]
    if not cfg.train.compile:
        train.pop("compile_backend", None)  # read only when compiling
    if train.get("objective") in (None, cfg.objective):  # the family's own objective: the family says it
        train.pop("objective", None)
    if cfg.objective != "masked_lm":
        train.pop("masking", None)  # read only by masked-LM training
    if cfg.objective != "span_corruption":
        train.pop("spans", None)  # read only by span corruption
    if cfg.objective != "permutation_lm":
        train.pop("permutation", None)  # read only by permutation LM
    if cfg.train.lora is not None:
        check_lora_targets(cfg)
    if cfg.train.init_from:  # the weights' identity, not just their path
        train["init_from"] = init_identity(cfg.train.init_from)
    mixture = {"mixture": cfg.data.mixture()} if cfg.data.sources else {}  # what training draws (prepare ignores it)
    model = fingerprint_view(cfg.model)
    for key, default in _MODEL_LATER_DEFAULTS.items():
        if model.get(key) == default:
            del model[key]
    return {"model": model, "train": train, **mixture}


def _section(cfg: Config) -> dict[str, Any]:
    return section_for(cfg, resolve_hardware(cfg))


def _check_device(ctx: StageContext, use_gpu: bool) -> None:
    """The plan fingerprinted a device kind; with Ray up, make sure the workers really get it."""
    planned = ctx.section["train"]["device"]
    if planned != ("cuda" if use_gpu else "cpu"):
        raise ConfigError(f"train: the plan resolved the workers' device as {planned} (in the fingerprint) but Ray "
                          f"gives them {'GPUs' if use_gpu else 'no GPU'}; set resources.train.num_gpus explicitly")


def _trainer(worker_config: dict[str, Any], ctx: StageContext, scaling: dict[str, Any]) -> Any:
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchConfig, TorchTrainer

    t, store = ctx.config.train, ctx.output.store()
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=worker_config,
        torch_config=TorchConfig(backend="nccl" if scaling["use_gpu"] else "gloo"),
        scaling_config=ScalingConfig(**scaling),
        # a remote store's own filesystem object keeps its options (endpoint, region) that a bare URI would lose
        run_config=RunConfig(name="ray_train", storage_path=ctx.out_uri if store.is_local else store.stage_path("train", ctx.fingerprint),
                             storage_filesystem=None if store.is_local else store.fs,
                             failure_config=FailureConfig(max_failures=t.max_failures),
                             checkpoint_config=CheckpointConfig(num_to_keep=t.keep_checkpoints),
                             worker_runtime_env={"env_vars": _worker_env(scaling)}),
    )


def _worker_env(scaling: dict[str, Any]) -> dict[str, str]:
    """Training workers' environment: the fault drills', and DeepSpeed told the CPU is the device when it is (it
    would find no GPU and warn, on every worker, that it may have missed one)."""
    return {**faults.env(), **({} if scaling["use_gpu"] else {"DS_ACCELERATOR": "cpu"})}


def run(ctx: StageContext) -> dict[str, float]:
    t_begin = time.perf_counter()
    cfg = ctx.config
    t = cfg.train
    tok = ctx.inputs["tokenizer"]
    vocab = int(tok.manifest["metrics"]["vocab_size"])
    scaling = train_scaling(cfg.resources.train, t.num_workers)
    hw = ctx.section["train"]
    _check_device(ctx, scaling["use_gpu"])
    store = ctx.output.store()
    if t.init_from:  # refuse a mismatched architecture before launching anything
        check_init_compatible(init_config(t.init_from), model_dict(cfg, vocab), t.init_from)
    # a kept folder (resume): the worker count, precision and device kind of its checkpoints, before launch
    check_resume_layout(f"{store.stage_path('train', ctx.fingerprint)}/ray_train", t.num_workers, fs=store.fs,
                        precision=hw["precision"], device=hw["device"])
    worker_config = {
        "model": model_dict(cfg, vocab),
        "train": {**t.model_dump(mode="json"), "precision": hw["precision"], "device": hw["device"],
                  # a relative path is the user's working directory's, not the Ray worker's
                  "init_from": str(Path(t.init_from).expanduser().resolve()) if t.init_from else None},
        "seq_len": cfg.train_seq_len,
        "train_shards": [],  # each worker opens the prepared data on its own node
        "prepare": asdict(ctx.inputs["prepare"].ref),
        "tracking_uri": ctx.tracker.tracking_uri,
        "run_id": ctx.tracker.worker_run_id(ctx.run_id),  # None while MLflow is down and the run not yet made
        "mixture": cfg.data.mixture(),
        "objective": objective_ids(cfg, tok.file("tokenizer.json")),
        "meta": {"tokenizer_sha256": ctx.inputs["prepare"].manifest.get("tokenizer_sha256"),
                 "prepare_fingerprint": ctx.inputs["prepare"].fingerprint, "train_fingerprint": ctx.fingerprint},
    }
    try:
        with forward_progress(ctx.progress) as sink:  # rank 0's progress lines reach the display through it
            result = _trainer({**worker_config, "progress": sink}, ctx, scaling).fit()
    except SystemExit as e:
        # Ray Train's own Ctrl-C handler aborts the workers, then exits 0: for the pipeline the run was interrupted
        # (the parent run is KILLED, the CLI exits 130, the checkpoints so far stay for the rerun to resume from)
        raise KeyboardInterrupt("training interrupted (SIGINT)") from e
    except Exception as e:  # Ray wraps a worker's error; a user error inside it is reported as itself
        cause = user_cause(e)
        if cause is None:
            raise
        raise (cause if isinstance(cause, UserError) else TrainingError(f"train: {cause}")) from e
    if result.checkpoint is None:
        raise TrainingError("train: Ray Train finished without a checkpoint")
    with result.checkpoint.as_directory() as d:
        if not verify_checkpoint(d):
            raise TrainingError(f"train: the final checkpoint {result.checkpoint.path} does not verify against its markers")
        for name in ("model.safetensors", "model.json", STATE):
            if not (Path(d) / name).is_file():
                raise TrainingError(f"train: final checkpoint {d} has no {name}")
            shutil.copyfile(Path(d) / name, ctx.out_dir / name)
        for name in ADAPTER_FILES if t.lora else ():  # the adapter beside the merged model
            if not (Path(d) / name).is_file():
                raise TrainingError(f"train: final checkpoint {d} has no {name}")
            shutil.copyfile(Path(d) / name, ctx.out_dir / name)
    shutil.copyfile(tok.file("tokenizer.json"), ctx.out_dir / "tokenizer.json")
    ctx.tracker.log_artifact(ctx.run_id, ctx.out_dir / "model.json")
    if t.log_model:  # servable with `mlflow models serve -m <uri> --env-manager local`; tagged `model_uri`
        ctx.tracker.log_model(ctx.run_id, ctx.out_dir, eos_token=cfg.tokenizer.eos_token,
                              registered_name=t.registered_model_name, mask_token=t.masking.mask_token)
    # from the final checkpoint, not from this run's last report: a run resumed from the final checkpoint trained nothing
    metrics = json.loads((ctx.out_dir / STATE).read_text()).get("metrics", {})
    final = {k.removeprefix("train/"): float(v) for k, v in metrics.items()
             if isinstance(v, (int, float)) and k.startswith("train/")}
    out = {"final_" + k if k in ("loss", "lr") else k: v for k, v in final.items()}
    wall = time.perf_counter() - t_begin
    if "steps_s" in out and wall > 0:  # the share of the stage spent outside optimizer steps (start-up, checkpoints)
        out.update(wall_s=wall, outside_steps_frac=max(0.0, 1.0 - out["steps_s"] / wall))
    return {**out, **_shares(cfg)}


def _shares(cfg: Config) -> dict[str, float]:
    """A mixture's realised share of each source over the run's samples (`share_<name>`), from the same pure
    function the workers draw with; `share_error` is the largest distance from a weight."""
    if not cfg.data.sources:
        return {}
    mix = cfg.data.mixture()
    shares = realised_shares(cfg.train.steps, global_batch=cfg.train.global_batch_size, weights=list(mix.values()))
    out = {f"share_{name}": float(x) for name, x in zip(mix, shares)}
    out["share_error"] = float(max(abs(x - w) for x, w in zip(shares, mix.values())))
    return out


STAGE = Stage(name="train", needs=("tokenizer", "prepare"), section=_section, version=2, run=run, resumable=True,
              input_context="training", main_input="prepare",
              params=lambda cfg: {"model": as_dict(cfg.model), "train": as_dict(cfg.train)})
