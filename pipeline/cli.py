"""The command line: `llmpipe run|status CONFIG [KEY.PATH=VALUE ...]`; on a Ray cluster `submit CONFIG ...`,
`logs JOB`, `status --job JOB`, `stop JOB` (see `pipeline.jobs`); the tools for a trained model:
`generate` (sample from it) and `export-hf` (a Hugging Face folder), both in `pipeline.model_tools`, and
`compare` (evaluation metrics side by side);
and `ui`, the MLflow UI of the tracking store (see `pipeline.tracking.ui`).

`run` prints the pipeline's own lines and a live progress per stage (`pipeline.terminal`); what Ray, DeepSpeed
and MLflow print goes to a log file per stage, which it names (`pipeline.runlogs`), or with `-v` to the terminal.

Known errors (config, input data, workflow requests, store, training, a folder
or run id that leads to no model) become one line on stderr and exit code 2, and
so does a write the system refuses (disk full, quota, file too large, read-only
or no permission), naming the file when the system does; anything else is a bug
and keeps its traceback. For `run` and `status` the
config is fully validated, and every fingerprint computed, before any work
starts. The tools take a stage folder or an MLflow run id (see `pipeline.runs`).
"""

from __future__ import annotations

import argparse
import errno
import logging
import os
import sys
from pathlib import Path

from model.generation import SamplingOptions
from pipeline.config import load_config
from pipeline.engine.execute import execute
from pipeline.engine.plan import plan
from pipeline.engine.store import ArtifactStore
from pipeline.errors import ConfigError, user_cause
from pipeline.runlogs import latest_log_folder, log_folders
from pipeline.terminal import Output
from tokenization.bpe import EOS, PAD
from tokenization.masking import MASK

# The system refused a file operation for a reason the user fixes (space, quota, permissions, a file where a
# folder should be): one line, not a traceback.
REFUSED = {errno.ENOSPC, errno.EDQUOT, errno.EFBIG, errno.EROFS, errno.EACCES, errno.EPERM, errno.ENOTDIR}
TOOLS = ("generate", "export-hf", "compare", "config", "ui")
JOB_COMMANDS = ("submit", "logs", "stop")


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmpipe", description="Train transformer LMs as a cached workflow on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the stale and missing stages")
    _run_arguments(r)
    s = sub.add_parser("status", help="show each stage as cached, stale (with the changed keys) or missing; "
                                      "with --job, a submitted job's state")
    s.add_argument("config", nargs="?")
    s.add_argument("overrides", nargs="*")
    s.add_argument("--job", metavar="JOB_ID", help="the state of this Ray job instead")
    s.add_argument("--address", help="Ray job server (default: RAY_ADDRESS if http(s), else http://127.0.0.1:8265)")
    s.add_argument("-v", "--verbose", action="store_true", help="show the libraries' logging too")
    _job_parsers(sub)
    _tool_parsers(sub)
    return p


def _run_arguments(r: argparse.ArgumentParser) -> None:
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--only", metavar="STAGE", help="run this stage alone against cached upstreams")
    g.add_argument("--from", dest="from_stage", metavar="STAGE", help="force this stage and everything downstream")
    r.add_argument("--to", metavar="STAGE", help="stop after this stage: run only it and the stages it needs")
    r.add_argument("--force", metavar="STAGE", action="append", default=[], help="force this stage (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    r.add_argument("-v", "--verbose", action="store_true",
                   help="show Ray's, DeepSpeed's and MLflow's output here instead of in the run's log files")


def _job_parsers(sub: argparse._SubParsersAction) -> None:
    address = "Ray job server (default: RAY_ADDRESS if http(s), else http://127.0.0.1:8265)"
    j = sub.add_parser("submit", help="run the pipeline on a Ray cluster as a Ray job (same arguments as run)")
    _run_arguments(j)
    j.add_argument("--address", help=address)
    j.add_argument("--working-dir", default=".", help="the folder shipped to the cluster; must hold CONFIG (default: .)")
    j.add_argument("--env", action="append", default=[], metavar="NAME", help="pass this environment variable to the job (repeatable)")
    j.add_argument("--tracking-uri", help="MLflow URI as the cluster reaches it (default: MLFLOW_TRACKING_URI)")
    j.add_argument("--no-wait", action="store_true", help="print the job id and return instead of following its logs")
    lg = sub.add_parser("logs", help="print a submitted job's logs")
    lg.add_argument("job")
    lg.add_argument("--follow", "-f", action="store_true", help="stream until the job ends")
    lg.add_argument("--address", help=address)
    st = sub.add_parser("stop", help="stop a submitted job")
    st.add_argument("job")
    st.add_argument("--address", help=address)


def _tool_parsers(sub: argparse._SubParsersAction) -> None:
    target = "a train/evaluate/decode stage folder, or the MLflow run id of such a stage or of a parent run"
    g = sub.add_parser("generate", help="sample completions from a trained model")
    g.add_argument("target", help=target + "; or a config (.yaml) whose train (and index) stages are committed")
    g.add_argument("--prompt", action="append", required=True, help="a prompt (repeatable)")
    d = SamplingOptions()  # the defaults, declared once
    g.add_argument("--max-new-tokens", type=int, default=d.max_new_tokens)
    g.add_argument("--temperature", type=float, default=d.temperature, help="0 is greedy")
    g.add_argument("--top-k", type=int, default=d.top_k, help="0 turns top-k off")
    g.add_argument("--top-p", type=float, default=d.top_p)
    g.add_argument("--repetition-penalty", type=float, default=d.repetition_penalty)
    g.add_argument("--num-beams", type=int, default=d.num_beams, help="beam search when > 1")
    g.add_argument("--length-penalty", type=float, default=d.length_penalty)
    g.add_argument("--num-samples", type=int, default=d.num_samples, help="completions per prompt")
    g.add_argument("--seed", type=int, default=d.seed)
    g.add_argument("--eos-token", default=EOS, help="stop at this token")
    g.add_argument("--retrieve", type=int, metavar="K",
                   help="prepend each prompt's K best passages from --index, or from the config's index stage")
    g.add_argument("--index", metavar="FOLDER", help="an index stage folder (the store's index/<fingerprint>)")
    g.add_argument("overrides", nargs="*", help="config overrides (key=value) when TARGET is a config")
    g.add_argument("--mask-token", default=MASK, help="an encoder: the mask token it fills in the prompts")
    e = sub.add_parser("export-hf", help="write a trained model as a Hugging Face GPT-2, LLaMA, BERT, RoBERTa or T5 folder")
    e.add_argument("target", help=target)
    e.add_argument("out", help="the folder to write")
    e.add_argument("--eos-token", default=EOS)
    e.add_argument("--pad-token", default=PAD, help="an encoder or encoder-decoder: the padding token (RoBERTa numbers "
                   "positions after it; T5's decoder starts from it)")
    e.add_argument("--mask-token", default=MASK, help="an encoder: the mask token")
    e.add_argument("--encoder-type", choices=("bert", "roberta"), default="bert",
                   help="an encoder: write BertForMaskedLM (default) or RobertaForMaskedLM")
    e.add_argument("--merge", action="store_true", help="a LoRA model: write the merged weights only (without: the "
                   "base, and the adapter in PEFT's format under OUT/adapter)")
    c = sub.add_parser("compare", help="evaluation metrics of several runs side by side")
    c.add_argument("runs", nargs="*", help="evaluate child runs or parent runs (MLflow run ids)")
    c.add_argument("--experiment", help="compare the newest evaluation of every distinct config in this experiment")
    c.add_argument("--metrics", action="append", default=[], metavar="GLOB", help="only these metrics, e.g. 'ppl_ctx_*'")
    u = sub.add_parser("ui", help="serve the MLflow UI of the tracking store on 127.0.0.1 and print the newest run's address")
    u.add_argument("--experiment", help="the newest run of this experiment (default: of any experiment)")
    u.add_argument("--port", type=int, default=5000, help="port on 127.0.0.1 for a local store's UI (default: 5000)")
    r = sub.add_parser("config", help="the configuration reference, generated from the schema")
    r.add_argument("--reference", action="store_true", required=True, help="print the reference (Markdown tables)")
    r.add_argument("--write", metavar="README", help="replace the generated block in this file instead of printing")
    for tool in (g, e, c, u):
        tool.add_argument("--tracking-uri", default=None, help="MLflow tracking URI (default: MLFLOW_TRACKING_URI)")


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    default_level = "INFO" if getattr(args, "verbose", False) else "WARNING"
    logging.basicConfig(level=os.environ.get("LLMPIPE_LOG", default_level), format="%(levelname)s %(name)s: %(message)s")
    if args.command in TOOLS:
        from pipeline.model_tools import export_hf, generate

        tool = {"generate": generate, "export-hf": export_hf, "compare": _compare, "config": _config,
                "ui": _ui}[args.command]
        return _guarded(lambda: tool(args))
    if args.command in JOB_COMMANDS or (args.command == "status" and args.job):
        return _guarded(lambda: _jobs(args))
    return _guarded(lambda: _workflow(args))


def _guarded(fn) -> int:
    """User errors (`pipeline.errors`) become one line and exit code 2, wherever they were raised (a Ray task or
    worker error carries them inside); anything else is a bug and keeps its traceback."""
    try:
        return fn() or 0
    except KeyboardInterrupt:
        print("llmpipe: interrupted", file=sys.stderr)
        return 130
    except Exception as e:
        cause = user_cause(e)
        if cause is None and isinstance(refused := _refused(e), OSError):
            where = refused.filename2 or refused.filename  # shutil.copyfile names the source first, the destination second
            print(f"llmpipe: error: {refused.strerror}" + (f": {where}" if where else ""), file=sys.stderr)
            return 2
        if cause is None:
            raise
        print(f"llmpipe: error: {cause}", file=sys.stderr)
        return 2


def _refused(e: BaseException) -> OSError | None:
    """The system's refusal of a file operation inside `e` (disk full, quota, permissions...), if that is what it is."""
    from pipeline.errors import causes

    found = [x for x in causes(e) if isinstance(x, OSError) and x.errno in REFUSED]
    return found[-1] if found else None


def _jobs(args: argparse.Namespace) -> int:
    from pipeline.cluster import jobs

    if args.command == "status":
        info = jobs.status(args.job, address=args.address)
        print(f"{info['job']}: {info['status']}" + (f" ({info['message']})" if info["message"] else ""))
        return 0
    if args.command == "stop":
        print(f"{args.job}: " + ("stop requested" if jobs.stop(args.job, address=args.address) else "already ended"))
        return 0
    if args.command == "logs":
        if args.follow:
            return 0 if jobs.follow(args.job, address=args.address) == "SUCCEEDED" else 1
        print(jobs.logs(args.job, address=args.address), end="")
        return 0
    run_args = [*(["--only", args.only] if args.only else []), *(["--from", args.from_stage] if args.from_stage else []),
                *(["--to", args.to] if args.to else []),
                *[a for f in args.force for a in ("--force", f)], *(["--dry-run"] if args.dry_run else []),
                *(["--verbose"] if args.verbose else [])]
    job = jobs.submit(args.config, args.overrides, run_args, address=args.address, working_dir=args.working_dir,
                      env=args.env, tracking_uri=args.tracking_uri)
    print(f"submitted {job} to {jobs.job_address(args.address)}: follow with `llmpipe logs {job} -f`, "
          f"see `llmpipe status --job {job}`")
    if args.no_wait:
        return 0
    final = jobs.follow(job, address=args.address)
    print(f"{job}: {final}")
    return 0 if final == "SUCCEEDED" else 1


def _workflow(args: argparse.Namespace) -> int:
    from pipeline.stages import STAGES

    if not args.config:
        raise ConfigError("status: give a CONFIG (or --job JOB_ID)")
    cfg = load_config(args.config, args.overrides)
    store = ArtifactStore(cfg.store.root)
    if args.command == "status":
        for it in plan(cfg, store, STAGES):
            print(it.describe().replace(" -> run", "").replace(" -> skip", ""))
        for line in _where(cfg, store):
            print(line)
        return 0
    items = plan(cfg, store, STAGES, only=args.only, from_stage=args.from_stage, force=args.force, to=args.to)
    # Library output (Ray, DeepSpeed, MLflow) goes to a log file per stage, unless -v asks for it here.
    quiet = not (args.verbose or args.dry_run)
    log_dir = log_folders(store.base if store.is_local else store.uri, is_local=store.is_local) if quiet else None
    with Output(log_dir=log_dir) as out:
        out.line(f"plan for {cfg.name} (store {store.uri}):")
        for it in items:
            out.line("  " + it.describe())
        if args.dry_run:
            return 0
        if not any(it.run for it in items):
            out.line("nothing to run: every stage is cached")
        manifests = execute(cfg, items, STAGES, output=out)
        ev = manifests.get("evaluate", {}).get("metrics", {})
        if "exact_match" in ev:
            out.line(f"validation seq2seq loss {ev['seq2seq_loss']:.4f} (ppl {ev['seq2seq_ppl']:.2f}), exact match "
                     f"{ev['exact_match']:.3f} on {int(ev['pairs'])} pairs")
        for m, what in (("mlm", "masked"), ("span", "span")):
            if f"{m}_loss" in ev:
                unigram = f" vs unigram {ev[f'{m}_unigram_loss']:.4f}" if f"{m}_unigram_loss" in ev else ""
                out.line(f"validation {what} loss {ev[f'{m}_loss']:.4f} (ppl {ev[f'{m}_ppl']:.2f}){unigram}, {what}-token "
                         f"accuracy {ev[f'{m}_accuracy']:.3f} on {int(ev[f'{m}_tokens'])} {what} tokens")
        if "val_loss" in ev:
            out.line(f"validation loss {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}, {ev['val_bpb']:.4f} bits/byte) "
                     f"vs unigram {ev['unigram_loss']:.4f}")
        if "plm_loss" in ev:  # XLNet: the line above reads left to right; this, its training objective
            out.line(f"validation permutation-LM loss {ev['plm_loss']:.4f} (ppl {ev['plm_ppl']:.2f}), accuracy "
                     f"{ev['plm_accuracy']:.3f} on {int(ev['plm_tokens'])} tokens predicted last in random orders")
        memory = sorted(int(k.split("_")[2]) for k in ev if k.startswith("loss_ctx_") and k.endswith("_memory"))
        if memory and f"loss_ctx_{memory[-1]}_sliding" in ev:  # a segment-memory model, at its longest length
            L = memory[-1]
            speed = ev[f"tokens_per_s_ctx_{L}_memory"] / max(ev[f"tokens_per_s_ctx_{L}_sliding"], 1e-9)
            out.line(f"with its memory over {L} tokens: loss {ev[f'loss_ctx_{L}_memory']:.4f} "
                     f"({ev[f'bpb_ctx_{L}_memory']:.4f} bits/byte) vs sliding windows {ev[f'loss_ctx_{L}_sliding']:.4f} "
                     f"vs one window {ev.get(f'loss_ctx_{L}', float('nan')):.4f}; memory reads {speed:.1f}x the "
                     "tokens/s of sliding windows")
        for line in _task_lines(manifests.get("tasks", {}).get("metrics", {})):  # the tasks stage, when configured
            out.line(line)
    return 0


def _task_lines(metrics: dict[str, float]) -> list[str]:
    """One line per task from the stage's metrics, e.g.
    `task next_line: acc 0.412 ± 0.028 (acc_norm 0.390 ± 0.028) vs chance 0.250, n=250`."""
    by_task: dict[str, dict[str, float]] = {}
    for key, value in metrics.items():
        if key.startswith("tasks/"):
            name, _, m = key[len("tasks/"):].rpartition("/")
            by_task.setdefault(name, {})[m] = value
    lines = []
    for name, m in by_task.items():
        extra = (f" (acc_norm {m['acc_norm']:.3f} ± {m['acc_norm_stderr']:.3f})" if "acc_norm" in m
                 else f" (target perplexity {m['ppl']:.4g})")
        lines.append(f"task {name}: acc {m['acc']:.3f} ± {m['acc_stderr']:.3f}{extra} vs chance {m['chance']:.3f}, "
                     f"n={int(m['n'])}")
    return lines


def _where(cfg, store: ArtifactStore) -> list[str]:
    """`status`: where the newest run's logs are and how to see the runs in MLflow."""
    from pipeline.tracking.mlflow import tracking_uri
    from pipeline.tracking.ui import is_server

    logs = latest_log_folder(store.base if store.is_local else store.uri, is_local=store.is_local)
    lines = [f"logs: {logs} (the newest run's: run.log and a file per stage)"] if logs else []
    if not cfg.tracking.enabled:
        return [*lines, "MLflow: off (tracking.enabled: false)"]
    uri = tracking_uri()
    ui = f"its UI: {uri}" if is_server(uri) else "`llmpipe ui` serves its UI on http://127.0.0.1:5000"
    return [*lines, f"MLflow: experiment {cfg.experiment_name!r} in {uri}; {ui}"]


def _ui(args: argparse.Namespace) -> None:
    from pipeline.tracking.mlflow import tracking_uri
    from pipeline.tracking.ui import UiServer, addresses, is_server, latest_parent

    uri = args.tracking_uri or tracking_uri()
    newest = latest_parent(uri, args.experiment)
    if is_server(uri):  # a tracking server is its own UI
        print("\n".join(addresses(uri.rstrip("/"), newest)))
        return
    server = UiServer(uri, args.port).start()
    print(f"MLflow UI of {uri} on {server.base} (Ctrl-C stops it; its log: {server.log})")
    print("\n".join(addresses(server.base, newest)), flush=True)
    server.wait()


def _compare(args: argparse.Namespace) -> None:
    from pipeline.tracking.compare import (
        comparison_table,
        evaluate_runs,
        experiment_evaluate_runs,
    )

    if bool(args.runs) == bool(args.experiment):
        raise ConfigError("compare: give run ids or --experiment NAME (not both)")
    runs = (experiment_evaluate_runs(args.experiment, tracking_uri=args.tracking_uri) if args.experiment
            else evaluate_runs(args.runs, tracking_uri=args.tracking_uri))
    print(comparison_table(runs, metrics=args.metrics, tracking_uri=args.tracking_uri))


def _config(args: argparse.Namespace) -> None:

    from pipeline import config_reference

    if not args.write:
        print(config_reference.reference(), end="")
        return
    path = Path(args.write)
    text = path.read_text(encoding="utf-8")
    if config_reference.BEGIN not in text or config_reference.END not in text:
        raise ConfigError(f"{path}: no generated block to replace (the two config-reference marker comments)")
    path.write_text(config_reference.replace_in(text), encoding="utf-8")
    print(f"{path}: configuration reference updated")
