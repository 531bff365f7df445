"""Experiment configuration: one YAML file per experiment, validated before any work.

The schema is a tree of pydantic models with `extra="forbid"`, so a misspelt key
is an error rather than a silently ignored default, and a float must be finite
(`.inf` or `.nan` is never a learning rate). Every error, whatever the document
holds (a list at the top, an impossible date, a nesting too deep for the YAML
parser), becomes a single `ConfigError` line naming the file and the dotted
key path; nothing else escapes `load_config`. CLI overrides are
dotted assignments (`train.lr=3e-4`) parsed as YAML scalars and applied to the
raw mapping *before* validation, so they are checked exactly like the file.

Fields marked `fingerprint=False` (worker counts, logging intervals) and the
whole `resources` section
do not change a stage's output and are left out of its fingerprint: scaling a
run out must not invalidate its data. See `fingerprint_view`.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any, Literal

import yaml
from pydantic import BaseModel, ConfigDict, Field, ValidationError, model_validator

from pipeline.errors import ConfigError
from tokenization.documents import DocOptions


def _nf(default: Any, description: str, **kw: Any) -> Any:
    """A field that does not enter the fingerprint."""
    return Field(default, description=description, json_schema_extra={"fingerprint": False}, **kw)


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid", validate_assignment=True, allow_inf_nan=False)


class StoreConfig(_Section):
    root: str = Field("artifacts", description="Artifact store root: a local folder or any pyarrow.fs URI (s3://, gs://).")


class DataConfig(_Section):
    inputs: list[str] = Field(..., min_length=1, description="Files, directories or globs; local, pyarrow.fs URIs or pkg://PACKAGE/glob.")
    text_field: str = Field("text", description="JSONL key / Parquet column holding the document text.")
    val_fraction: float = Field(0.05, gt=0.0, lt=1.0, description="Fraction of documents (by content hash) held out for validation.")
    shard_size_mb: float = Field(64.0, gt=0.0, description="Target raw bytes per shard; fixes the shard plan, hence the output bytes.")
    append_eos: bool = Field(True, description="Append the EOS token after every document.")
    on_error: Literal["raise", "skip"] = Field("raise", description="Bad records: stop with an error naming file:line, or skip, count and list them.")
    replace_invalid_utf8: bool = Field(False, description="Replace invalid UTF-8 bytes with U+FFFD (counted) instead of applying on_error.")
    normalize: Literal["nfc", "none"] = Field("nfc", description="Unicode normalisation of every document.")
    min_chars: int = Field(1, ge=0, description="Drop documents with fewer non-blank characters (counted as too_short).")
    max_chars: int | None = Field(None, ge=1, description="Drop documents longer than this (counted as too_long).")
    dedup: bool = Field(True, description="Drop exact duplicate documents (by content hash) across all shards.")
    num_tasks: int | None = _nf(None, "Ray tasks for prepare (default: one per shard); never changes the output.", ge=1)
    max_retries: int = _nf(3, "Ray retries of a task whose worker died.", ge=0)

    @model_validator(mode="after")
    def _length_order(self) -> DataConfig:
        if self.max_chars is not None and self.max_chars < self.min_chars:
            raise ValueError(f"data.max_chars ({self.max_chars}) is below data.min_chars ({self.min_chars})")
        return self

    def doc_options(self) -> DocOptions:
        return DocOptions(text_field=self.text_field, on_error=self.on_error, replace_invalid_utf8=self.replace_invalid_utf8,
                          normalize=self.normalize, min_chars=self.min_chars, max_chars=self.max_chars)


class TokenizerConfig(_Section):
    vocab_size: int = Field(4096, ge=260, le=1 << 20, description="BPE vocabulary size, including the 256 byte tokens and specials.")
    min_frequency: int = Field(2, ge=1, description="Minimum pair frequency for a BPE merge.")
    max_train_bytes: int = Field(64 << 20, gt=0, description="Train on a deterministic sample of about this many bytes, spread over the corpus.")
    special_tokens: list[str] = Field(["<|endoftext|>", "<|pad|>"], min_length=1, description="Special tokens, added first.")
    eos_token: str = Field("<|endoftext|>", description="The token that ends a document (must be a special token).")
    path: str | None = Field(None, description="Load this tokenizer.json (or a local Hugging Face tokenizer folder) instead of training one.")

    @model_validator(mode="after")
    def _eos_is_special(self) -> TokenizerConfig:
        if self.path is None and self.eos_token not in self.special_tokens:
            raise ValueError(f"tokenizer.eos_token {self.eos_token!r} is not in tokenizer.special_tokens {self.special_tokens}")
        return self


class ModelSection(_Section):
    preset: str | None = Field(None, description="A named size (gpt2-small, gpt2-medium, llama-60m, llama-160m, demo); keys given here override it.")
    n_layer: int = Field(4, ge=1, description="Transformer blocks.")
    n_head: int = Field(4, ge=1, description="Attention (query) heads.")
    n_kv_head: int | None = Field(None, ge=1, description="Key/value heads: n_head (multi-head, default), a divisor (grouped-query), 1 (multi-query).")
    d_model: int = Field(128, ge=8, description="Residual stream width.")
    d_ff: int | None = Field(None, ge=1, description="MLP hidden width (default 4 * d_model; about 8/3 * d_model for SwiGLU).")
    max_seq_len: int = Field(256, ge=2, description="Training context; the size of a learned position table.")
    pos_encoding: Literal["learned", "sinusoidal", "rope", "alibi", "none"] = Field("learned", description="Positional encoding.")
    rope_theta: float = Field(10000.0, gt=0.0, description="RoPE base wavelength.")
    rope_scaling: Literal["none", "linear", "ntk", "yarn"] = Field("none", description="RoPE context extension used in training.")
    rope_factor: float = Field(1.0, ge=1.0, description="Context extension factor for rope_scaling.")
    norm: Literal["layernorm", "rmsnorm"] = Field("layernorm", description="Normalisation.")
    mlp: Literal["gelu", "gelu_tanh", "swiglu"] = Field("gelu", description="MLP activation.")
    tie_embeddings: bool = Field(True, description="Share the token embedding with the unembedding.")
    dropout: float = Field(0.0, ge=0.0, lt=1.0, description="Dropout on attention, MLP and embeddings.")
    bias: bool = Field(True, description="Bias in linear layers and LayerNorm.")
    norm_eps: float = Field(1e-5, gt=0.0, description="Normalisation epsilon.")
    init_std: float = Field(0.02, gt=0.0, description="Init std; residual projections get init_std / sqrt(2 * n_layer).")
    activation_checkpointing: bool = _nf(False, "Recompute each block in the backward pass (less memory, same result).")

    @model_validator(mode="before")
    @classmethod
    def _apply_preset(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("preset"), str):  # other types: the field reports them
            from model import PRESETS

            if data["preset"] not in PRESETS:
                raise ValueError(f"unknown preset {data['preset']!r} (known: {', '.join(PRESETS)})")
            base = {k: v for k, v in PRESETS[data["preset"]].items() if k != "vocab_size"}  # the tokenizer sets the vocab
            return {**base, **data}
        return data

    @model_validator(mode="after")
    def _buildable(self) -> ModelSection:
        from model import ModelConfig

        try:  # the model's own checks (head divisibility, KV heads, ...) before any work starts
            ModelConfig(vocab_size=256, **self.model_config_fields())
        except (ValueError, AssertionError) as e:
            raise ValueError(str(e)) from None
        return self

    def model_config_fields(self) -> dict[str, Any]:
        return self.model_dump(mode="json", exclude={"preset"})


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
    precision: Literal["auto", "fp32", "bf16", "fp16"] = Field("auto", description="auto: bf16 on GPUs that support it, fp32 on CPU.")
    seed: int = Field(1337, description="Seed for init, data order and dropout.")
    offload_optimizer: bool = Field(False, description="ZeRO-Offload: optimizer states (and step) on the CPU; needs zero_stage >= 1.")
    offload_params: bool = Field(False, description="ZeRO-Infinity style parameter offload to the CPU; needs zero_stage 3.")
    init_from: str | None = Field(None, description="Start from these weights: a train stage folder, a model folder (model.safetensors + model.json) or a local Hugging Face folder.")
    eval_every: int | None = Field(None, ge=1, description="Validation loss every N steps (logged as train/val_loss).")
    eval_tokens: int = Field(32768, ge=1, description="Validation tokens scored each time.")
    deepspeed: dict[str, Any] = Field(default_factory=dict, description="Raw DeepSpeed JSON merged last (escape hatch).")
    peak_tflops: float | None = _nf(None, "Peak TFLOP/s per worker for MFU (default: looked up from the GPU model).", gt=0.0)
    log_model: bool = _nf(True, "Log the trained model to MLflow as a pyfunc text-generation model (`mlflow models serve`).")
    registered_model_name: str | None = _nf(None, "Also register the logged model under this name in the MLflow registry.")
    num_workers: int = _nf(2, "Ray Train workers (one GPU each when GPUs are used).", ge=1)
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


class EvaluateConfig(_Section):
    max_tokens: int = Field(200_000, ge=1, description="Validation tokens scored per context length.")
    context_multipliers: list[float] = Field([0.5, 1.0, 2.0, 4.0, 8.0], min_length=1,
                                             description="Evaluate at these multiples of the training context (1.0 is always added).")
    sliding_window: bool = Field(False, description="Score overlapping windows (every token once, with at least window - stride tokens of context).")
    stride: int | None = Field(None, ge=1, description="Sliding-window step in tokens (default: half of each window; at most the window).")
    rope_scalings: list[Literal["none", "linear", "ntk", "yarn"]] = Field(
        ["none"], min_length=1, description="RoPE models: also sweep lengths past the training context with these inference-time scalings.")
    position_buckets: int = Field(16, ge=1, description="Loss by position within the window, averaged over this many equal buckets.")
    batch_size: int = _nf(8, "Windows of the training context per forward pass (longer windows get proportionally fewer).", ge=1)

    @model_validator(mode="after")
    def _positive_multipliers(self) -> EvaluateConfig:
        if any(m <= 0 for m in self.context_multipliers):
            raise ValueError(f"evaluate.context_multipliers must all be > 0, got {self.context_multipliers}")
        return self


class DecodeConfig(_Section):
    prompts: list[str] = Field(default_factory=lambda: ["\n"], min_length=1, description="Prompts to complete.")
    prompts_file: str | None = Field(None, description="Read the prompts from this file instead (.jsonl: a JSON string or "
                                     "{\"prompt\": ...} per line; else one prompt per non-empty line); its content is fingerprinted.")
    max_new_tokens: int = Field(64, ge=1, description="Tokens generated per sample.")
    temperature: float = Field(0.8, ge=0.0, description="0 means greedy.")
    top_k: int | None = Field(50, ge=1, description="Sample from the k most likely tokens.")
    top_p: float | None = Field(None, gt=0.0, le=1.0, description="Nucleus sampling: the smallest set of tokens holding this mass.")
    repetition_penalty: float = Field(1.0, gt=0.0, description="CTRL's penalty on tokens already seen (1 = off).")
    num_beams: int = Field(1, ge=1, description="Beam search with this many beams when > 1 (sampling options are then unused).")
    length_penalty: float = Field(1.0, description="Beam search: a finished beam scores log-prob / new_tokens ** length_penalty.")
    num_samples: int = Field(1, ge=1, description="Samples per prompt (with beam search: the best num_samples beams).")
    seed: int = Field(0, description="Sampling seed.")
    batch_size: int = _nf(16, "Sequences decoded together (left-padded) per forward pass.", ge=1)

    @model_validator(mode="after")
    def _beams_cover_samples(self) -> DecodeConfig:
        if self.num_beams > 1 and self.num_samples > self.num_beams:
            raise ValueError(f"decode.num_samples ({self.num_samples}) exceeds decode.num_beams ({self.num_beams}) with beam search")
        return self


class StageResources(_Section):
    """What Ray reserves for one task of a stage (train: for each worker). Never fingerprinted."""

    num_cpus: float = Field(1.0, gt=0.0, description="CPUs per task (prepare: per tokenize task, also capping its threads; train: per worker).")
    num_gpus: float | None = Field(None, ge=0.0, description="GPUs per task; default: 1 for train/evaluate/decode when the cluster has GPUs, else 0.")
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


class TrackingConfig(_Section):
    enabled: bool = Field(True, description="Log runs to MLflow (MLFLOW_TRACKING_URI, else MLflow's local default).")
    experiment: str | None = Field(None, description="MLflow experiment (default: the config name).")


class Config(_Section):
    name: str = Field(..., min_length=1, description="Experiment name; also the MLflow experiment.")
    store: StoreConfig = Field(default_factory=StoreConfig)
    data: DataConfig
    tokenizer: TokenizerConfig = Field(default_factory=TokenizerConfig)
    model: ModelSection = Field(default_factory=ModelSection)
    train: TrainConfig = Field(default_factory=TrainConfig)
    evaluate: EvaluateConfig = Field(default_factory=EvaluateConfig)
    decode: DecodeConfig = Field(default_factory=DecodeConfig)
    resources: ResourcesConfig = Field(default_factory=ResourcesConfig)
    tracking: TrackingConfig = Field(default_factory=TrackingConfig)

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
        return self

    @property
    def train_seq_len(self) -> int:
        """The training window: train.seq_len, else the model's context."""
        return self.train.seq_len or self.model.max_seq_len

    @property
    def experiment_name(self) -> str:
        return self.tracking.experiment or self.name


# --- loading ---------------------------------------------------------------

_MOVED = {"data.num_cpus_per_task": "resources.prepare.num_cpus", "train.cpus_per_worker": "resources.train.num_cpus",
          "train.use_gpu": "resources.train.num_gpus", "evaluate.num_cpus": "resources.evaluate.num_cpus",
          "decode.num_cpus": "resources.decode.num_cpus"}


def _key(part: Any) -> str:
    """A key path component as printed: a key holding a newline or other control character is quoted,
    so the error stays one line."""
    text = str(part)
    return text if text.isprintable() else repr(text)


def _yaml(text: str) -> Any:
    """yaml.safe_load that fails only with YAMLError or ValueError. PyYAML's constructors raise plain
    Python errors for a scalar its tag cannot hold (`2001-13-01`, `!!int x`, `!!bool x`, a bare `!!float`)
    and RecursionError for a nesting deeper than Python's stack; they become ValueErrors here."""
    try:
        return yaml.safe_load(text)
    except RecursionError:
        raise ValueError("nested too deeply") from None
    except ValueError as e:
        raise ValueError(f"a value YAML cannot construct: {e}") from None
    except (LookupError, AttributeError, TypeError) as e:
        raise ValueError(f"a value YAML cannot construct ({type(e).__name__}: {e})") from None


def _problem(e: yaml.YAMLError) -> str:
    """What is wrong, in one line (a ReaderError, e.g. a control character, has no `problem`)."""
    return getattr(e, "problem", None) or str(e).splitlines()[0]


def _format_error(source: str, err: ValidationError) -> str:
    first = err.errors()[0]
    loc = ".".join(_key(p) for p in first["loc"])
    msg = first["msg"].removeprefix("Value error, ")
    if first["type"] == "extra_forbidden":
        msg = "unknown key" + (f" (moved to {_MOVED[loc]})" if loc in _MOVED else "")
    elif first["type"] == "missing":
        msg = "required key is missing"
    more = f" (+{len(err.errors()) - 1} more)" if len(err.errors()) > 1 else ""
    return f"{source}: {loc}: {msg}{more}" if loc else f"{source}: {msg}{more}"


def apply_overrides(raw: dict[str, Any], overrides: list[str]) -> dict[str, Any]:
    """Apply `a.b.c=value` assignments (values parsed as YAML) to a raw mapping."""
    for item in overrides:
        key, sep, value = item.partition("=")
        if not sep or not key or any(not p for p in key.split(".")):
            raise ConfigError(f"override {item!r}: expected KEY.PATH=VALUE")
        node = raw
        parts = key.split(".")
        for p in parts[:-1]:
            child = node.setdefault(p, {})
            if not isinstance(child, dict):
                raise ConfigError(f"override {item!r}: {p} is not a section")
            node = child
        try:
            node[parts[-1]] = _yaml(value) if value != "" else ""
        except yaml.YAMLError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({_problem(e)})") from None
        except ValueError as e:
            raise ConfigError(f"override {item!r}: value is not valid YAML ({e})") from None
    return raw


def parse_config(raw: Any, *, source: str = "<config>") -> Config:
    if not isinstance(raw, dict):
        raise ConfigError(f"{source}: top level must be a mapping, got {type(raw).__name__}")
    try:
        return Config.model_validate(raw)
    except ValidationError as e:
        raise ConfigError(_format_error(source, e)) from None


def load_config(path: str | Path, overrides: list[str] | None = None) -> Config:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"{path}: config file not found")
    try:
        raw = _yaml(path.read_text(encoding="utf-8"))
    except yaml.YAMLError as e:
        mark = getattr(e, "problem_mark", None)
        where = f":{mark.line + 1}" if mark else ""
        raise ConfigError(f"{path}{where}: invalid YAML ({_problem(e)})") from None
    except UnicodeDecodeError as e:
        raise ConfigError(f"{path}: not UTF-8 text (byte {e.start})") from None
    except ValueError as e:
        raise ConfigError(f"{path}: invalid YAML ({e})") from None
    raw = raw if raw is not None else {}
    if isinstance(raw, dict):  # otherwise parse_config says the top level must be a mapping
        raw = apply_overrides(raw, overrides or [])
    return parse_config(raw, source=str(path))


def fingerprint_view(section: BaseModel) -> dict[str, Any]:
    """The fields of a section that change the output (fingerprint=False ones dropped)."""
    out: dict[str, Any] = {}
    for name, field in type(section).model_fields.items():
        extra = field.json_schema_extra if isinstance(field.json_schema_extra, dict) else {}
        if extra.get("fingerprint") is False:
            continue
        value = getattr(section, name)
        out[name] = fingerprint_view(value) if isinstance(value, BaseModel) else _plain(value)
    return out


def _plain(value: Any) -> Any:
    if isinstance(value, tuple):
        return [_plain(v) for v in value]
    if isinstance(value, list):
        return [_plain(v) for v in value]
    if isinstance(value, dict):
        return {k: _plain(v) for k, v in value.items()}
    return value


def flatten(d: dict[str, Any], prefix: str = "") -> dict[str, Any]:
    """{"a": {"b": 1}} -> {"a.b": 1}: for MLflow params and 'which keys changed'."""
    out: dict[str, Any] = {}
    for k, v in d.items():
        key = f"{prefix}{k}"
        if isinstance(v, dict) and v:
            out.update(flatten(v, key + "."))
        else:
            out[key] = v
    return out
