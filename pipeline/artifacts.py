"""What committed stage folders hold that other stages and the tools read: the model folder.

A train stage folder ends with `model.safetensors`, `model.json` and the
tokenizer (`MODEL_FILES`): all that `evaluate`, `decode`, `llmpipe generate`,
`export-hf` and the served model load. `model_dir_from_folder` leads from any
train, evaluate or decode stage folder to that model folder, through the
committed manifest of the store (`pipeline.engine.store`), never by rebuilding
the store's layout by hand; `committed_dirs` leads from a config to its
committed train and index folders (`llmpipe generate CONFIG --retrieve K`).
"""

from __future__ import annotations

from pathlib import Path

from pipeline.engine.store import ArtifactStore
from pipeline.errors import TargetError

MODEL_FILES = ("model.safetensors", "model.json", "tokenizer.json")


def has_model(folder: Path) -> bool:
    return all((folder / f).is_file() for f in MODEL_FILES)


def model_dir_from_folder(folder: Path) -> Path:
    """A train stage folder (or any folder with model.safetensors, model.json, tokenizer.json), or an evaluate or
    decode stage folder, whose committed manifest names its train upstream (a sibling in the same store)."""
    if has_model(folder):
        return folder
    store, stage = ArtifactStore.of_folder(folder)
    manifest = store.folder_manifest(stage, folder.name)
    if manifest is None:
        raise TargetError(f"{folder}: no {', '.join(MODEL_FILES)} and no _COMPLETE.json (not a committed stage folder)")
    train_fp = manifest.get("upstream", {}).get("train")
    if not train_fp:
        raise TargetError(f"{folder}: this stage has no train upstream; give a train, evaluate or decode stage folder")
    train_dir = Path(store.stage_path("train", train_fp))
    if not has_model(train_dir):
        raise TargetError(f"{folder}: its train upstream {train_dir} is missing or incomplete")
    return train_dir


def committed_dirs(config: str, overrides: list[str] | None = None) -> tuple[Path, Path | None]:
    """The committed train folder a config leads to, and its committed index folder when the config has an `index:`
    section (None without one): the folders `llmpipe run CONFIG` wrote, found by planning the config, never rebuilt."""
    from pipeline.config import load_config
    from pipeline.engine.plan import plan
    from pipeline.stages import STAGES

    cfg = load_config(config, overrides or [])
    store = ArtifactStore(cfg.store.root)
    fps = {it.stage.name: it.fingerprint for it in plan(cfg, store, STAGES)}
    out = []
    for stage in ("train", "index"):
        if stage not in fps:
            out.append(None)
            continue
        if store.manifest(stage, fps[stage]) is None:
            raise TargetError(f"{config}: its {stage} stage ({fps[stage][:16]}) is not committed: "
                              f"run `llmpipe run {config}` first")
        out.append(store.local_dir(stage, fps[stage]))
    return out[0], out[1]
