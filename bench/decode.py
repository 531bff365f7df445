"""Decoding throughput: our `generate_batch` vs Hugging Face `generate` on the same weights, side by side.

Three random-weight models of a few tens of millions of parameters, one LLaMA-style
(RoPE, RMSNorm, SwiGLU, grouped-query attention, separate unembedding), one
GPT-2-style (learned positions, LayerNorm, tanh GELU, tied unembedding) and one
T5-style encoder-decoder (relative position bias, ReLU, tied), are built here,
exported with `model.hf.export_hf` and loaded back by `transformers` from that
folder, so both sides run identical weights. Each side decodes greedily a fixed
number of new tokens (no stop token) from the same prompts (the T5's sources:
its encoder runs inside the timing, once per request on both sides), at batch 1
and batch 8; the two are run alternately, after one warm-up each, and the median of
`--repeats` runs is reported as new tokens per second (prefill included). The
script also checks that both produce the same tokens.

    python -m bench.decode --repeats 5 --new-tokens 64
"""

from __future__ import annotations

import argparse
import tempfile
from functools import partial

import torch

from bench._measure import describe_cpu, header, interleaved_medians, row, seconds
from model import GPT, ModelConfig, build_model, export_hf, generate_batch
from model.seq2seq import conditioned

MODELS = {
    "llama-style (6L/384d, GQA 6/2)": ModelConfig(
        vocab_size=32000, n_layer=6, n_head=6, n_kv_head=2, d_model=384, d_ff=1024, max_seq_len=1024,
        pos_encoding="rope", norm="rmsnorm", norm_eps=1e-6, mlp="swiglu", bias=False, tie_embeddings=False),
    "gpt2-style (6L/384d)": ModelConfig(
        vocab_size=50257, n_layer=6, n_head=6, d_model=384, max_seq_len=1024, pos_encoding="learned",
        norm="layernorm", mlp="gelu_tanh", bias=True, tie_embeddings=True),
    "t5-style (6+6L/384d)": ModelConfig(
        vocab_size=32128, family="encoder-decoder", pos_encoding="t5", n_layer=6, n_head=6, d_model=384, d_ff=1536,
        max_seq_len=512, norm="rmsnorm", norm_eps=1e-6, mlp="relu", bias=False, scale_attention=False,
        tie_embeddings=True),
}
START = 0  # the T5's decoder start (its padding token)


def ours(model: GPT, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    if model.config.family == "encoder-decoder":  # encode once, then decode from the start token
        return generate_batch(conditioned(model, prompts), [[START]] * len(prompts), max_new_tokens=new_tokens,
                              temperature=0.0)
    return generate_batch(model, prompts, max_new_tokens=new_tokens, temperature=0.0)


def theirs(hf_model: torch.nn.Module, prompts: list[list[int]], new_tokens: int) -> list[list[int]]:
    idx = torch.tensor(prompts)
    seq2seq = hf_model.config.is_encoder_decoder
    with torch.inference_mode():
        out = hf_model.generate(idx, attention_mask=torch.ones_like(idx), max_new_tokens=new_tokens, do_sample=False,
                                pad_token_id=0, eos_token_id=None, min_length=0,  # no stop token: exactly new_tokens
                                **({"decoder_start_token_id": START} if seq2seq else {}))
    return out[:, 1:].tolist() if seq2seq else out[:, idx.shape[1]:].tolist()


def bench_model(name: str, cfg: ModelConfig, *, batches: list[int], prompt_len: int, new_tokens: int,
                repeats: int) -> list[str]:
    from transformers import AutoModelForCausalLM, AutoModelForSeq2SeqLM

    torch.manual_seed(0)
    model = build_model(cfg).eval()
    with tempfile.TemporaryDirectory() as folder:
        seq2seq = cfg.family == "encoder-decoder"
        export_hf(model, folder, **({"pad_token_id": START} if seq2seq else {}))
        hf_model = (AutoModelForSeq2SeqLM if seq2seq else AutoModelForCausalLM).from_pretrained(folder).eval()
    rows = []
    for B in batches:
        prompts = torch.randint(0, cfg.vocab_size, (B, prompt_len), generator=torch.Generator().manual_seed(B)).tolist()
        same = ours(model, prompts, new_tokens) == theirs(hf_model, prompts, new_tokens)  # also the warm-up
        med = interleaved_medians({"ours": partial(seconds, ours, model, prompts, new_tokens),
                                   "theirs": partial(seconds, theirs, hf_model, prompts, new_tokens)}, repeats)
        ours_tps, theirs_tps = B * new_tokens / med["ours"], B * new_tokens / med["theirs"]
        rows.append(row([name, f"{model.num_params / 1e6:.1f}M", B, f"{theirs_tps:,.0f}", f"{ours_tps:,.0f}",
                         f"{ours_tps / theirs_tps:.2f}x", "yes" if same else "NO"]))
        print(rows[-1], flush=True)
    return rows


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--repeats", type=int, default=5)
    ap.add_argument("--new-tokens", type=int, default=64)
    ap.add_argument("--prompt-len", type=int, default=32)
    ap.add_argument("--batches", type=int, nargs="+", default=[1, 8])
    args = ap.parse_args()
    import transformers

    print(f"{describe_cpu()}, torch {torch.__version__}, "
          f"transformers {transformers.__version__}; greedy, prompt {args.prompt_len} tokens, "
          f"{args.new_tokens} new tokens, median of {args.repeats}\n", flush=True)
    columns = header(["model", "params", "batch", "transformers tok/s", "ours tok/s", "ratio", "same tokens"])
    print("\n".join(columns), flush=True)
    rows = []
    for name, cfg in MODELS.items():
        rows += bench_model(name, cfg, batches=args.batches, prompt_len=args.prompt_len, new_tokens=args.new_tokens,
                            repeats=args.repeats)
    print("\n" + "\n".join(columns + rows))


if __name__ == "__main__":
    main()
