"""The experiment config's schema: every section and field, declared once, with its documentation.

Each field is declared once. The sections that configure a pure layer *are* that
layer's dataclass, validated by pydantic: `model` is `model.ModelConfig` (plus a
`preset` name), `evaluate` is `model.scoring.EvalOptions` (plus `model.rag.RetrieveOptions`), `decode` is
`model.generation.SamplingOptions` plus the prompts, and `data` is
`tokenization.documents.DocOptions` plus the corpus and sharding fields. The
sections only the pipeline has (store, tokenizer, train, resources, tracking) are
pydantic models here. Every section forbids unknown keys, so a misspelt key is an
error rather than a silently ignored default, and a float must be finite (`.inf`
or `.nan` is never a learning rate). A field's docstring is its documentation:
the README's configuration reference is generated from them
(`pipeline.config_reference`), and a test keeps the two equal.

Loading (`pipeline.config`) turns every error, whatever the document holds,
into a single `ConfigError` line naming the file and the dotted key path.

Fields whose metadata says `fingerprint: False` (worker counts, logging
intervals, batch sizes that do not change a result) and the whole `resources`
section do not change a stage's output and are left out of its fingerprint:
scaling a run out must not invalidate its data. See `pipeline.fingerprints`.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

from model.config import ModelConfig
from model.generation import SamplingOptions
from model.lora import LoraOptions
from model.presets import PRESETS
from model.rag import RetrieveOptions
from model.scoring import EvalOptions
from pipeline.corpus_config import DataConfig, IndexConfig, no_fp
from pipeline.families import check_family, objective_of
from tokenization.bpe import EOS, SPECIAL_TOKENS
from tokenization.masking import MaskingOptions
from tokenization.permutation import PermutationOptions
from tokenization.spans import SpanOptions


def _nf(default: Any, description: str, **kw: Any) -> Any:
    """A pydantic field that does not enter the fingerprint."""
    return Field(default, description=description, json_schema_extra={"fingerprint": False}, **kw)


_no_fp = no_fp  # a dataclass field that does not enter the fingerprint (`pipeline.corpus_config`)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StoreConfig(_Section):
    root: str = Field("artifacts", description="Artifact store root: a local folder or any pyarrow.fs URI (s3://, gs://).")


class TokenizerConfig(_Section):
    vocab_size: int = Field(4096, ge=260, le=1 << 20, description="BPE vocabulary size, including the 256 byte tokens and specials.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    max_train_bytes: int = Field(64 << 20, gt=0, description="Train on a deterministic sample of about this many bytes, spread over the corpus.")
    special_tokens: list[str] = Field(SPECIAL_TOKENS, min_length=1, description="Special tokens, added first.")
    eos_token: str = Field(EOS, description="The token that ends a document (must be a special token).")
    path: str | None = Field(None, description="Load this tokenizer.json (or a local Hugging Face tokenizer folder) instead of training one.")
    sentinels: int = Field(0, ge=0, le=1000, description="Add this many sentinel tokens <|sentinel_0|>, <|sentinel_1|>, ... after special_tokens: span corruption (T5) marks each dropped span of a window with one, so a window needs as many as it has spans.")

    @model_validator(mode="after")
    def _eos_is_special(self) -> TokenizerConfig:
        if self.path is None and self.eos_token not in self.special_tokens:
            raise ValueError(f"tokenizer.eos_token {self.eos_token!r} is not in tokenizer.special_tokens {self.special_tokens}")
        return self


@dataclass(kw_only=True)
class ModelSection(ModelConfig):
    """The `model` section: `ModelConfig`'s fields, optionally starting from a named preset."""

    preset: str | None = _no_fp(None)
    """A named size: gpt2-small (124M), gpt2-medium (355M), llama-60m, llama-160m, demo; keys given beside it override it."""

    def model_config_fields(self) -> dict[str, Any]:
        """The `ModelConfig` keyword arguments (everything but the preset name)."""
        return {f.name: getattr(self, f.name) for f in dataclasses.fields(ModelConfig)}


class TrainConfig(_Section):
    steps: int = Field(200, ge=1, description="Optimizer steps (the step budget; no epochs).")
    seq_len: int | None = Field(None, ge=2, description="Training window (default model.max_seq_len).")
    global_batch_size: int = Field(32, ge=1, description="Sequences per optimizer step across all workers.")
    global_batch_tokens: int | None = Field(None, ge=1, description="If set, the global batch in tokens; global_batch_size = this / seq_len.")
    micro_batch_size: int = Field(8, ge=1, description="Sequences per worker per forward pass.")
    lr: float = Field(1e-3, gt=0.0, description="Peak learning rate.")
    min_lr: float = Field(1e-4, ge=0.0, description="Learning rate at the end of the cosine decay.")
    warmup_steps: int = Field(20, ge=0, description="Linear warmup steps.")
    lr_schedule: Literal["cosine", "linear", "constant", "wsd"] = Field("cosine", description="After warmup: cosine or linear decay to min_lr, constant, or warmup-stable-decay.")
    decay_fraction: float = Field(0.2, gt=0.0, le=1.0, description="wsd: the final fraction of the steps that decays linearly to min_lr.")
    weight_decay: float = Field(0.1, ge=0.0, description="AdamW weight decay (matrices only).")
    betas: tuple[float, float] = Field((0.9, 0.95), description="AdamW betas.")
    grad_clip: float = Field(1.0, ge=0.0, description="Global gradient-norm clip (0 disables).")
    zero_stage: Literal[0, 1, 2, 3] = Field(2, description="DeepSpeed ZeRO stage.")
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPUs that support it, fp32 on CPU; resolved on the driver, the fingerprint holds the result and the device kind.")
    seed: int = Field(1337, description="Seed for init, data order and dropout.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer states (and step) on the CPU; needs zero_stage >= 1.")
    offload_params: bool = Field(False, description="ZeRO-Infinity style parameter offload to the CPU; needs zero_stage 3.")
    compile: bool = Field(False, description="torch.compile the model inside DeepSpeed (`engine.compile`, with compile_backend). Compiled kernels round differently from eager ones, so the train fingerprint holds it when on.")
    compile_backend: str = Field("inductor", description="The torch.compile backend when compile is on (inductor: generated kernels; aot_eager: graph capture only, for debugging).")
    packing: Literal["stream", "documents"] = Field("stream", description="stream: windows cut from the concatenated documents attend across document boundaries; documents: each token attends only within its own document (block-diagonal causal mask) and positions restart at each document start; evaluation scores the same way.")
    init_from: str | None = Field(None, description="Start from these weights: a train stage folder, a model folder (model.safetensors + model.json) or a local Hugging Face folder.")
    lora: LoraOptions | None = Field(None, description="Train LoRA adapters on a frozen base instead of every weight (usually with init_from); default: full fine-tuning.")
    objective: Literal["causal_lm", "masked_lm", "span_corruption", "seq2seq", "permutation_lm"] | None = Field(None, description="What the model learns to predict: causal_lm (the next token; decoders), masked_lm (the original tokens at masked positions; encoders), span_corruption (the spans dropped from the source, each behind its sentinel; encoder-decoders), seq2seq (each record's completion from its prompt; encoder-decoders on prompt_completion data) or permutation_lm (the last tokens of a random factorisation order of each window; XLNet). Default: the model family's (an encoder-decoder: seq2seq on prompt_completion data, else span_corruption).")
    masking: MaskingOptions = Field(default_factory=MaskingOptions, description="masked_lm: how windows are corrupted (rate, mask token, 80/10/10 split, dynamic or static masks).")
    spans: SpanOptions = Field(default_factory=SpanOptions, description="span_corruption: how windows are corrupted (noise density, mean span length, dynamic or static).")
    permutation: PermutationOptions = Field(default_factory=PermutationOptions, description="permutation_lm: which positions of each window's factorisation order are predicted (the last 1/K).")
    eval_every: int | None = Field(None, ge=1, description="Validation loss every N steps (logged as train/val_loss).")
    eval_tokens: int = Field(32768, ge=1, description="Validation tokens scored each time.")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed JSON merged last (escape hatch; batch sizes must still agree).")
    peak_tflops: float | None = _nf(None, "Peak TFLOP/s per worker for MFU (default: looked up from the GPU model).", gt=0.0)
    log_model: bool = _nf(True, "Log the trained model to MLflow as a pyfunc text-generation model (`mlflow models serve`).")
    registered_model_name: str | None = _nf(None, "Also register the logged model under this name in the MLflow registry.")
    num_workers: int = _nf(2, "Ray Train workers (one GPU each when GPUs are used); the same samples and schedule, equal up to floating-point reduction order.", ge=1)
    checkpoint_every: int = _nf(100, "Checkpoint every N steps (and always at the end).", ge=1)
    keep_checkpoints: int = _nf(2, "Checkpoints kept (newest first).", ge=1)
    max_failures: int = _nf(2, "Worker-group restarts Ray Train attempts from the last checkpoint.", ge=0)
    log_every: int = _nf(10, "Log step metrics every N steps.", ge=1)

    @model_validator(mode="after")
    def _combinations(self) -> TrainConfig:
        if self.min_lr > self.lr:
            raise ValueError(f"min_lr ({self.min_lr}) must not exceed lr ({self.lr})")
        if self.offload_optimizer and self.zero_stage == 0:
            raise ValueError("train.offload_optimizer needs train.zero_stage >= 1 (ZeRO partitions what it offloads)")
        if self.offload_params and self.zero_stage != 3:
            raise ValueError(f"train.offload_params needs train.zero_stage 3, got {self.zero_stage}")
        if self.precision == "fp16" and self.zero_stage == 0 and self.offload_optimizer:
            raise ValueError("train.precision fp16 with offload needs ZeRO")
        return self


@dataclass(frozen=True, kw_only=True)
class EvaluateConfig(EvalOptions):
    """The `evaluate` section: the scoring sweep (`EvalOptions`) and, optionally, retrieval."""

    retrieve: RetrieveOptions | None = None
    """Also score validation documents with retrieved passages in front (needs an `index:` section): {k: 4, query_tokens: 32, target_tokens: 32, max_docs: 256}, see "Retrieval-augmented generation"; `rag/...` metrics. Unset: off, and the stage's fingerprint is as without the key."""


@dataclass(frozen=True, kw_only=True)
class DecodeConfig(SamplingOptions):
    """The `decode` section: the prompts, and how to complete them (`SamplingOptions`)."""

    prompts: list[str] = dataclasses.field(default_factory=lambda: ["\n"])
    """Prompts to complete."""
    prompts_file: str | None = None
    """Read the prompts from this file instead (.jsonl: a JSON string or {"prompt": ...} per line; else one prompt per non-empty line); its content is fingerprinted."""
    retrieve: int | None = None
    """Prepend each prompt's top-k retrieved passages (needs an `index:` section); each sample records its sources. Unset: off."""
    qa_file: str | None = None
    """Facts check: a JSONL file of {"question": ..., "answer": ...}; each question is answered greedily with and without retrieval (needs retrieve) and exact match is logged as rag/facts_em and rag/facts_em_base. Its content is fingerprinted."""

    def __post_init__(self) -> None:
        super().__post_init__()
        if self.retrieve is not None and self.retrieve < 1:
            raise ValueError(f"DecodeConfig.retrieve: must be >= 1 (or unset), got {self.retrieve}")
        if not self.prompts:
            raise ValueError("DecodeConfig.prompts: give at least one prompt (or prompts_file)")

    def sampling_options(self) -> SamplingOptions:
        """Just the sampling options (what a decoding task needs)."""
        return SamplingOptions(**{f.name: getattr(self, f.name) for f in dataclasses.fields(SamplingOptions)})


class TaskSpec(_Section):
    """One task of the `tasks` section: a JSON Lines file of records in lm-evaluation-harness's shapes."""

    name: str = Field(..., pattern=r"^[A-Za-z0-9_.-]+$", description="Names the task's metrics (`tasks/<name>/acc`); letters, digits, `_`, `.`, `-`.")
    path: str = Field(..., json_schema_extra={"fingerprint": False}, description="The task file (.jsonl; relative paths from the working directory); its content (sha256) is fingerprinted, not its path.")
    kind: Literal["multiple_choice", "cloze"] = Field(..., description="multiple_choice: {ctx, endings, label} or {question, choices: {text, label}, answerKey} records; cloze: {text} records, the target is the last word.")
    limit: int | None = Field(None, ge=1, description="Score only the first N records.")


class TasksConfig(_Section):
    """The `tasks` section (optional): multiple-choice and cloze accuracy of the trained model."""

    suite: list[TaskSpec] = Field(..., min_length=1, description="The tasks to score, each {name, path, kind, limit}.")
    batch_size: int = _nf(32, "Sequences (a context and one continuation) per forward pass.", ge=1)

    @field_validator("suite")
    @classmethod
    def _unique_names(cls, value: list[TaskSpec]) -> list[TaskSpec]:
        names = [t.name for t in value]
        if dup := sorted({n for n in names if names.count(n) > 1}):
            raise ValueError(f"task names must be unique (they name the metrics), repeated: {', '.join(dup)}")
        return value


class StageResources(_Section):
    """What Ray reserves for one task of a stage (train: for each worker). Never fingerprinted."""

    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per task (prepare: per tokenize task, also capping its threads; train: per worker).")
    num_gpus: float | None = Field(None, ge=0.0, description="GPUs per task; default: 1 for train/evaluate/decode/tasks when the cluster has GPUs, else 0.")
    memory_gb: float | None = Field(None, gt=0.0, description="Memory Ray reserves per task, in GiB.")
    custom: dict[str, float] = Field(default_factory=dict, description="Custom Ray resources per task, e.g. {gpu_node: 1} (a resource your cluster.yaml gives some nodes).")
    label_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the task requires, e.g. {ray.io/accelerator-type: H100}.")
    spread: bool = Field(False, description="Spread the tasks (train: the workers) over nodes instead of packing them.")


class ResourcesConfig(_Section):
    tokenizer: StageResources = Field(default_factory=StageResources, description="The tokenizer-training task.")
    prepare: StageResources = Field(default_factory=StageResources, description="Each hash and tokenize task.")
    train: StageResources = Field(default_factory=StageResources, description="Each Ray Train worker.")
    evaluate: StageResources = Field(default_factory=StageResources, description="The evaluation task.")
    decode: StageResources = Field(default_factory=StageResources, description="The decoding task.")
    tasks: StageResources = Field(default_factory=StageResources, description="The task-evaluation task.")
    index: StageResources = Field(default_factory=StageResources, description="Each passage task and the index-building task (a GPU for it by default when index.kind embeds and the cluster has GPUs).")


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="Log runs to MLflow (MLFLOW_TRACKING_URI, else MLflow's local default).")
    experiment: str | None = Field(None, description="MLflow experiment (default: the config name).")

    @field_validator("experiment")
    @classmethod
    def _stays_in_the_store(cls, value: str | None) -> str | None:
        # It also names the store's <root>/_runs/<experiment>.json; '/' may stay (MLflow names use it), '..' may not.
        if value is not None and ({"..", "."} & set(value.replace("\\", "/").split("/")) or "\x00" in value):
            raise ValueError(f"{value!r} must not hold a '..' or '.' path component (it names a file in the store)")
        return value


class Config(_Section):
    name: str = Field(..., min_length=1, description="Experiment name, one folder name (the store keeps `_runs/<name>.json`); also the MLflow experiment.")
    store: StoreConfig = Field(default_factory=StoreConfig)
    data: DataConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    tasks: TasksConfig | None = Field(None, description="Task evaluation (multiple choice, cloze); the `tasks` stage runs only when this section is set.")
    index: IndexConfig | None = Field(None, description="A knowledge corpus to index for retrieval; the `index` stage runs only when this section is given.")
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

    @field_validator("name")
    @classmethod
    def _one_folder_name(cls, value: str) -> str:
        # The name is a path under the store root (<root>/_runs/<name>.json): it must not reach out of it.
        if value in (".", "..") or any(c in value for c in "/\\\x00"):
            raise ValueError(f"{value!r} must be one folder name (no '/', '\\', NUL, '.' or '..'): it names a file in the store")
        return value

    @field_validator("model", mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if not isinstance(data, dict):  # other types: the field reports them
            return data
        if "vocab_size" in data:
            raise ValueError("ModelSection.vocab_size: is set by the tokenizer (tokenizer.vocab_size), not in the model section")
        if isinstance(data.get("preset"), str):
            if data["preset"] not in PRESETS:
                raise ValueError(f"unknown preset {data['preset']!r} (known: {', '.join(PRESETS)})")
            base = {k: v for k, v in PRESETS[data["preset"]].items() if k != "vocab_size"}  # the tokenizer sets the vocab
            return {**base, **data}
        return data

    @model_validator(mode="after")
    def _cross_checks(self) -> Config:
        t = self.train
        seq_len = t.seq_len or self.model.max_seq_len
        if t.global_batch_tokens is not None:
            if t.global_batch_tokens % seq_len:
                raise ValueError(f"train.global_batch_tokens ({t.global_batch_tokens}) must be a multiple of the sequence length ({seq_len})")
            object.__setattr__(t, "global_batch_size", t.global_batch_tokens // seq_len)
        if self.model.pos_encoding == "learned" and seq_len > self.model.max_seq_len:
            raise ValueError(f"train.seq_len ({seq_len}) exceeds model.max_seq_len ({self.model.max_seq_len}) with learned positions")
        if t.global_batch_size % (t.micro_batch_size * t.num_workers):
            raise ValueError(
                f"train.global_batch_size ({t.global_batch_size}) must be a multiple of "
                f"train.micro_batch_size ({t.micro_batch_size}) x train.num_workers ({t.num_workers})"
            )
        if t.warmup_steps > t.steps:
            raise ValueError(f"train.warmup_steps ({t.warmup_steps}) exceeds train.steps ({t.steps})")
        check_family(self)
        return self

    @property
    def objective(self) -> str:
        """train.objective, or the model family's own when unset (`pipeline.families`)."""
        return objective_of(self)

    @property
    def train_seq_len(self) -> int:
        """The training window: train.seq_len, else the model's context."""
        return self.train.seq_len or self.model.max_seq_len

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name
