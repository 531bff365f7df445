"""Each rank's random number generators: seeded apart, saved with the rank's checkpoint files, restored on resume.

Dropout draws from torch's generator (the CUDA device's on a GPU). Ranks are
seeded `seed + rank` once the model is built (the initial weights stay one
function of `seed`, the same on every rank), so each rank draws its own dropout
masks; the data order never touches these generators (it is a pure function of
the seed and the step). At every checkpoint each rank writes the states of
torch's CPU generator, its CUDA device's generator where it has one, numpy's
and Python's global generators into `rng.rank<r>.json`: plain JSON (torch's
byte states in base64), never a pickle, listed and verified by the rank's
marker like its other files. A resumed rank restores them, so it draws exactly
the masks an uninterrupted run would have drawn.
"""

from __future__ import annotations

import base64
import json
import random
from pathlib import Path
from typing import Any

import numpy as np
import torch

from pipeline.errors import TrainingError


def rng_file(rank: int) -> str:
    return f"rng.rank{rank}.json"


def seed_rank(seed: int, rank: int) -> None:
    """Seed this rank's generators apart from every other rank's."""
    torch.manual_seed(seed + rank)  # every CUDA device's generator too
    np.random.seed((seed + rank) % 2**32)
    random.seed(seed + rank)


def _b64(state: torch.Tensor) -> str:
    return base64.b64encode(state.numpy().tobytes()).decode("ascii")


def _tensor(text: str) -> torch.Tensor:
    return torch.frombuffer(bytearray(base64.b64decode(text)), dtype=torch.uint8)


def capture_rng(device: torch.device) -> dict[str, Any]:
    kind, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    out: dict[str, Any] = {
        "torch": _b64(torch.get_rng_state()),
        "numpy": {"kind": kind, "keys": keys.tolist(), "pos": int(pos), "has_gauss": int(has_gauss), "cached": float(cached)},
        "python": {"version": version, "internal": list(internal), "gauss_next": gauss_next},
    }
    if device.type == "cuda":
        out["cuda"] = _b64(torch.cuda.get_rng_state(device))
    return out


def restore_rng(states: dict[str, Any], device: torch.device) -> None:
    torch.set_rng_state(_tensor(states["torch"]))
    n = states["numpy"]
    np.random.set_state((n["kind"], np.array(n["keys"], dtype=np.uint32), n["pos"], n["has_gauss"], n["cached"]))
    p = states["python"]
    random.setstate((p["version"], tuple(p["internal"]), p["gauss_next"]))
    if device.type == "cuda":
        torch.cuda.set_rng_state(_tensor(states["cuda"]), device)


def save_rng(folder: Path, *, rank: int, device: torch.device) -> None:
    (folder / rng_file(rank)).write_text(json.dumps(capture_rng(device)))


def load_rng(folder: Path, *, rank: int) -> dict[str, Any]:
    """This rank's states from a verified checkpoint folder."""
    try:
        return json.loads((folder / rng_file(rank)).read_text())
    except (OSError, ValueError) as e:
        raise TrainingError(f"train: checkpoint {folder} has no readable {rng_file(rank)} ({e}); "
                            "refusing a resume that would draw other dropout masks") from None
