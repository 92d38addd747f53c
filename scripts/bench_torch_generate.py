#!/usr/bin/env python3
"""PyTorch reference for the generation half of `cargo bench -p trainer --bench
model_throughput`: the same config (vocab 8192, hidden 384, 6 layers, 6 heads / 2 KV heads,
MLP 1024), 4 prompts of 128 tokens, 64 new tokens each, sampling at temperature 1 with the KV
cache (`transformers.generate`), the median of five runs as the bench reports its own.
`--model DIR` loads a Hugging Face folder instead (as the bench's `--model`), `--batch N` sets
the number of prompts.

    python3 scripts/bench_torch_generate.py cpu
    python3 scripts/bench_torch_generate.py cuda --dtype bf16
    python3 scripts/bench_torch_generate.py cpu --model models/smollm2-135m-instruct --batch 16
"""
import argparse
import time

import torch
import transformers

PROMPT, NEW_TOKENS = 128, 64
GENERATION_RUNS = 5


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("device")
    parser.add_argument("--dtype", default="f32", choices=["f32", "bf16"])
    parser.add_argument("--model", help="a Hugging Face model folder instead of the fixed config")
    parser.add_argument("--batch", type=int, default=4)
    args = parser.parse_args()
    batch = args.batch
    device = torch.device(args.device)
    config = transformers.LlamaConfig(
        vocab_size=8192, hidden_size=384, intermediate_size=1024, num_hidden_layers=6,
        num_attention_heads=6, num_key_value_heads=2, tie_word_embeddings=True,
        max_position_embeddings=2048, attn_implementation="sdpa")
    torch.manual_seed(0)
    dtype = torch.bfloat16 if args.dtype == "bf16" else torch.float32
    if args.model:
        model = transformers.AutoModelForCausalLM.from_pretrained(args.model, dtype=dtype)
        model = model.to(device).eval()
    else:
        model = transformers.LlamaForCausalLM(config).to(device, dtype).eval()
    vocab = model.config.vocab_size
    prompts = torch.tensor([[(i * 31 + b * 7) % vocab for i in range(PROMPT)] for b in range(batch)],
                           device=device)

    def run():
        with torch.no_grad():
            out = model.generate(prompts, attention_mask=torch.ones_like(prompts), do_sample=True,
                                 temperature=1.0, top_p=1.0, top_k=0, max_new_tokens=NEW_TOKENS,
                                 min_new_tokens=NEW_TOKENS, pad_token_id=0)
        return out.shape[1] - PROMPT

    def forward():
        with torch.no_grad():
            model(prompts, attention_mask=torch.ones_like(prompts)).logits[0, 0, 0].item()

    # The forward pass over the prompts alone (the prefill inside generation), as the Rust
    # bench prints it: a warm-up, then 5 passes.
    forward()
    start = time.perf_counter()
    for _ in range(5):
        forward()
    forward_tps = 5 * batch * PROMPT / (time.perf_counter() - start)
    run()  # warm-up
    # The median of five timed runs, as the Rust bench reports its own.
    rates = []
    for _ in range(GENERATION_RUNS):
        start = time.perf_counter()
        new = run()
        rates.append(batch * new / (time.perf_counter() - start))
    rate = sorted(rates)[GENERATION_RUNS // 2]
    print(f"impl=torch-generate-{args.dtype} device={args.device} batch={batch} prompt={PROMPT} "
          f"new_tokens={new} tokens_per_s={rate:.1f} "
          f"forward_tokens_per_s={forward_tps:.0f}", flush=True)


if __name__ == "__main__":
    main()
