"""Long-context evaluation: reading a stream with a segment memory vs sliding windows that give each token the
same context, side by side.

What a user scores a long text with otherwise is a strided sliding window (the recipe of Hugging Face's
perplexity guide): windows of M + T tokens advancing by T, each scoring its last T targets, so every target
has M or more tokens of context and each token is read (M + T) / T times. A model with a segment memory of M
reads the stream once, T tokens at a time, the memory holding the previous M positions' states
(`model.scoring.read_with_memory`; the sliding side is `read_sliding`, the functions `evaluate` uses). Both
sides run the same random-weight Transformer-XL model (relative encoding, memory M = T) on the same batch of
streams, in inference mode, alternately after one warm-up each; the median of `--repeats` runs is reported
as scored tokens per second.

    python -m bench.memory --repeats 5
"""

from __future__ import annotations

import argparse
from functools import partial

import torch

from bench._measure import describe_cpu, header, interleaved_medians, row, seconds
from model import GPT, ModelConfig
from model.scoring import read_sliding, read_with_memory

MODELS = {
    "xl 4L/256d, T=M=128": ModelConfig(vocab_size=4096, n_layer=4, n_head=4, d_model=256, max_seq_len=128,
                                       pos_encoding="xl", memory_len=128),
    "xl 6L/384d, T=M=256": ModelConfig(vocab_size=8192, n_layer=6, n_head=6, d_model=384, max_seq_len=256,
                                       pos_encoding="xl", memory_len=256),
}


@torch.inference_mode()
def memory_side(model: GPT, x: torch.Tensor) -> torch.Tensor:
    return read_with_memory(model, x, segment_len=model.config.max_seq_len)


@torch.inference_mode()
def sliding_side(model: GPT, x: torch.Tensor) -> torch.Tensor:
    return read_sliding(model, x, segment_len=model.config.max_seq_len, context=model.config.memory_len)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--batch", type=int, default=4)
    ap.add_argument("--segments", type=int, default=8, help="stream length in training contexts")
    args = ap.parse_args()
    print(f"{describe_cpu()}, torch {torch.__version__}; batch {args.batch}, streams of {args.segments} contexts, "
          f"median of {args.repeats}\n", flush=True)
    columns = header(["model", "stream tokens", "sliding windows tok/s", "memory tok/s", "ratio"])
    print("\n".join(columns), flush=True)
    rows = []
    for name, cfg in MODELS.items():
        torch.manual_seed(0)
        model = GPT(cfg).eval()
        L = cfg.max_seq_len * args.segments
        x = torch.randint(0, cfg.vocab_size, (args.batch, L), generator=torch.Generator().manual_seed(1))
        memory_side(model, x), sliding_side(model, x)  # warm-up
        med = interleaved_medians({"memory": partial(seconds, memory_side, model, x),
                                   "sliding": partial(seconds, sliding_side, model, x)}, args.repeats)
        tokens = args.batch * L
        rows.append(row([name, L, f"{tokens / med['sliding']:,.0f}", f"{tokens / med['memory']:,.0f}",
                         f"{med['sliding'] / med['memory']:.2f}x"]))
        print(rows[-1], flush=True)
    print("\n" + "\n".join(columns + rows))


if __name__ == "__main__":
    main()
