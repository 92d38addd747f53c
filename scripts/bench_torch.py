#!/usr/bin/env python3
"""PyTorch reference for `cargo bench -p trainer --bench train_throughput`: the same Llama
configs, batch and sequence, AdamW with global-norm clipping, one step = forward + backward +
clip + update. Prints one `key=value` line per mode.

    python3 scripts/bench_torch.py cpu 10m --batch 2 --seq 256 --steps 3
    python3 scripts/bench_torch.py cuda 125m --modes f32,tf32,bf16,bf16-compile --peak-tflops 989

Modes: f32, tf32 (TF32 matmuls), bf16 (autocast), and `-compile` suffixes (torch.compile).
"""
import argparse
import resource
import time

import torch
import transformers

# (vocab, hidden, layers, heads, MLP): keep in step with trainer/benches/train_throughput.rs.
CONFIGS = {
    "10m": (8192, 320, 6, 5, 864),
    "125m": (32000, 768, 12, 12, 2048),
    "350m": (32000, 1024, 24, 16, 2816),
}


def build(size, device):
    vocab, hidden, layers, heads, mlp = CONFIGS[size]
    config = transformers.LlamaConfig(
        vocab_size=vocab, hidden_size=hidden, intermediate_size=mlp, num_hidden_layers=layers,
        num_attention_heads=heads, num_key_value_heads=heads, max_position_embeddings=4096,
        tie_word_embeddings=True, rms_norm_eps=1e-5, attn_implementation="sdpa")
    torch.manual_seed(0)
    return transformers.LlamaForCausalLM(config).to(device), config


def bench(args, mode):
    device = torch.device(args.device)
    model, config = build(args.size, device)
    params = sum(p.numel() for p in model.parameters())
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-4, weight_decay=0.1, fused=device.type == "cuda")
    torch.backends.cuda.matmul.allow_tf32 = mode.startswith("tf32")
    torch.backends.cudnn.allow_tf32 = mode.startswith("tf32")
    autocast = mode.startswith("bf16")
    step_model = torch.compile(model) if mode.endswith("-compile") else model
    ids = (torch.arange(args.batch * (args.seq + 1)) * 7919 % config.vocab_size).view(args.batch, -1).to(device)
    inputs, labels = ids[:, :-1], ids[:, 1:]

    def step():
        with torch.autocast(device.type, dtype=torch.bfloat16, enabled=autocast):
            logits = step_model(input_ids=inputs).logits
            loss = torch.nn.functional.cross_entropy(logits.float().view(-1, logits.shape[-1]), labels.reshape(-1))
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.item()  # waits for the device, as ours does

    for _ in range(2):
        step()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats()
    start = time.perf_counter()
    for _ in range(args.steps):
        step()
    seconds = time.perf_counter() - start
    tokens_per_s = args.steps * args.batch * args.seq / seconds
    flops_per_token = 6 * params + 12 * config.num_hidden_layers * args.seq * config.hidden_size
    tflops = tokens_per_s * flops_per_token / 1e12
    mfu = f"{100 * tflops / args.peak_tflops:.1f}%" if args.peak_tflops else "n/a"
    if device.type == "cuda":
        memory = f"peak_gpu_mib={torch.cuda.max_memory_allocated() / 2**20:.0f}"
    else:
        memory = f"peak_host_rss_mib={resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024:.0f}"
    print(f"impl=torch-{mode} device={args.device} size={args.size} params={params / 1e6:.1f}M "
          f"batch={args.batch} seq={args.seq} steps={args.steps} tokens_per_s={tokens_per_s:.0f} "
          f"step_ms={1000 * seconds / args.steps:.1f} model_tflops={tflops:.2f} mfu={mfu} {memory}",
          flush=True)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("device")
    parser.add_argument("size", choices=sorted(CONFIGS))
    parser.add_argument("--batch", type=int, default=8)
    parser.add_argument("--seq", type=int, default=1024)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--modes", default="f32")
    parser.add_argument("--peak-tflops", type=float)
    args = parser.parse_args()
    for mode in args.modes.split(","):
        bench(args, mode)


if __name__ == "__main__":
    main()
