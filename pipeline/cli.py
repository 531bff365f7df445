"""The command line: `llmpipe run|status CONFIG [KEY.PATH=VALUE ...]`.

Known errors (config, input data, workflow requests, store, training) become
one line on stderr and exit code 2; anything else is a bug and keeps its
traceback. The config is fully validated, and every fingerprint computed,
before any work starts.
"""

from __future__ import annotations

import argparse
import logging
import os
import sys

from pipeline.config import ConfigError, load_config
from pipeline.store import ArtifactStore, StoreError
from pipeline.workflow import WorkflowError, execute, plan
from tokenization.readers import InputError

KNOWN_ERRORS = (ConfigError, InputError, WorkflowError, StoreError, FileNotFoundError)


def _parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="llmpipe", description="Train transformer LMs as a cached workflow on Ray.")
    sub = p.add_subparsers(dest="command", required=True)
    r = sub.add_parser("run", help="run the stale and missing stages")
    r.add_argument("config")
    r.add_argument("overrides", nargs="*", help="dotted overrides, e.g. train.lr=3e-4")
    g = r.add_mutually_exclusive_group()
    g.add_argument("--only", metavar="STAGE", help="run this stage alone against cached upstreams")
    g.add_argument("--from", dest="from_stage", metavar="STAGE", help="force this stage and everything downstream")
    r.add_argument("--force", metavar="STAGE", action="append", default=[], help="force this stage (repeatable)")
    r.add_argument("--dry-run", action="store_true", help="print the plan and stop")
    s = sub.add_parser("status", help="show each stage as cached, stale (with the changed keys) or missing")
    s.add_argument("config")
    s.add_argument("overrides", nargs="*")
    return p


def main(argv: list[str] | None = None) -> int:
    args = _parser().parse_args(argv)
    logging.basicConfig(level=os.environ.get("LLMPIPE_LOG", "WARNING"), format="%(levelname)s %(name)s: %(message)s")
    from pipeline.stages import STAGES
    from pipeline.stages.train import TrainingError

    try:
        cfg = load_config(args.config, args.overrides)
        store = ArtifactStore(cfg.store.root)
        if args.command == "status":
            for it in plan(cfg, store, STAGES):
                print(it.describe().replace(" -> run", "").replace(" -> skip", ""))
            return 0
        items = plan(cfg, store, STAGES, only=args.only, from_stage=args.from_stage, force=args.force)
        print(f"plan for {cfg.name} (store {store.uri}):")
        for it in items:
            print("  " + it.describe())
        if args.dry_run:
            return 0
        if not any(it.run for it in items):
            print("nothing to run: every stage is cached")
        manifests = execute(cfg, items, STAGES)
        ev = manifests.get("evaluate", {}).get("metrics", {})
        if "val_loss" in ev:
            print(f"validation loss {ev['val_loss']:.4f} (ppl {ev['val_ppl']:.2f}, {ev['val_bpb']:.4f} bits/byte) "
                  f"vs unigram {ev['unigram_loss']:.4f}")
        return 0
    except (*KNOWN_ERRORS, TrainingError) as e:
        cause = getattr(e, "cause", None) or e  # a RayTaskError carries the remote exception as .cause
        print(f"llmpipe: error: {cause}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print("llmpipe: interrupted", file=sys.stderr)
        return 130
