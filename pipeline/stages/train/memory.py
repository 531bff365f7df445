"""Training with a segment memory (Transformer-XL, `model.memory_len`): each batch row's stream and its memory.

Rows read consecutive windows of one token stream across steps
(`tokenization.dataset.segment_indices`), so each micro-batch of a rank keeps a
memory of its own rows' previous windows (`model.memory.SegmentMemory`). The
memories start empty and are emptied where the streams are cut afresh (every
`stream_length` steps, a new pass over the data).

On resume the memory is restored from the checkpoint, not rebuilt: what a
row's memory holds at step s was computed by the weights of step s - 1, which
a resumed run no longer has (and rebuilding it would need every step before).
So each rank writes its memories into `memory.rank<r>.safetensors` beside its
RNG states, listed and verified by its checkpoint marker like its other files,
and a resumed rank loads them: a resumed run trains exactly as an uninterrupted
one. Safetensors, never a pickle.
"""

from __future__ import annotations

from pathlib import Path

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file

from model.memory import SegmentMemory
from pipeline.errors import TrainingError
from tokenization.dataset import stream_length


def memory_file(rank: int) -> str:
    return f"memory.rank{rank}.safetensors"


class TrainMemories:
    """One segment memory per accumulation micro-batch of this rank."""

    def __init__(self, *, memory_len: int, micro_batches: int, stream_length: int):
        self.memories = [SegmentMemory(memory_len) for _ in range(micro_batches)]
        self.stream_length = stream_length

    def for_step(self, step: int) -> list[SegmentMemory]:
        """The memories of step `step`'s micro-batches, emptied where the streams begin anew."""
        if step % self.stream_length == 0:
            for memory in self.memories:
                memory.clear()
        return self.memories

    def save(self, folder: Path, *, rank: int) -> None:
        tensors = {f"micro{m}.{name}": t for m, memory in enumerate(self.memories)
                   for name, t in memory.state_dict().items()}
        save_file(tensors, str(folder / memory_file(rank)), metadata={"micro_batches": str(len(self.memories))})

    def load(self, folder: Path, *, rank: int, device: torch.device) -> None:
        try:
            tensors = load_file(str(folder / memory_file(rank)), device=str(device))
        except (OSError, SafetensorError) as e:
            raise TrainingError(f"train: checkpoint {folder} has no readable {memory_file(rank)} ({e}); refusing a "
                                "resume whose segment memory would start empty mid-stream") from None
        for m, memory in enumerate(self.memories):
            prefix = f"micro{m}."
            memory.load_state_dict({k.removeprefix(prefix): t for k, t in tensors.items() if k.startswith(prefix)})


def memories_for(memory_len: int, *, windows: int, global_batch: int, micro_batches: int, seq_len: int
                 ) -> TrainMemories | None:
    """A worker's memories (one per micro-batch) over streams of `stream_length` windows; None without a memory."""
    if not memory_len:
        return None
    if windows < global_batch:
        raise TrainingError(f"train: {windows} training windows of {seq_len + 1} tokens cannot give each of the "
                            f"{global_batch} batch rows a stream of its own (model.memory_len); give more text or a "
                            "smaller train.global_batch_size")
    return TrainMemories(memory_len=memory_len, micro_batches=micro_batches,
                         stream_length=stream_length(global_batch=global_batch, num_windows=windows))
