#!/usr/bin/env python3
"""PyTorch counterpart of `cargo bench -p trainer --bench matmul_shapes`: the matrix products of
one decoding step (every linear layer of a Llama config at ROWS rows, `F.linear` as transformers
computes them, MKL/oneDNN on CPU), timed alone; GFLOP/s per shape and their time per step.

    python3 scripts/bench_torch_matmul.py cpu --model models/smollm2-135m-instruct --rows 16
"""
import argparse
import json
import time

import torch
import torch.nn.functional as F


def shapes(config):
    hidden, layers = config["hidden_size"], config["num_hidden_layers"]
    head_dim = config.get("head_dim") or hidden // config["num_attention_heads"]
    q = config["num_attention_heads"] * head_dim
    kv = config.get("num_key_value_heads", config["num_attention_heads"]) * head_dim
    inter = config["intermediate_size"]
    return [("q_proj", q, hidden, layers), ("k_proj / v_proj", kv, hidden, 2 * layers),
            ("o_proj", hidden, q, layers), ("gate_proj / up_proj", inter, hidden, 2 * layers),
            ("down_proj", hidden, inter, layers), ("lm_head", config["vocab_size"], hidden, 1)]


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("device")
    parser.add_argument("--model", help="a Hugging Face model folder (its config.json)")
    parser.add_argument("--rows", type=int, default=4)
    args = parser.parse_args()
    if args.model:
        with open(f"{args.model}/config.json") as f:
            config = json.load(f)
    else:  # the model-throughput config
        config = dict(hidden_size=384, num_hidden_layers=6, num_attention_heads=6,
                      num_key_value_heads=2, intermediate_size=1024, vocab_size=8192)
    device, rows, step_seconds = torch.device(args.device), args.rows, 0.0
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads: "
          f"{args.model or 'model-throughput config'}, {rows} rows")
    with torch.no_grad():
        for name, out_features, in_features, per_step in shapes(config):
            w = torch.randn(out_features, in_features, device=device) * 0.02
            x = torch.randn(rows, in_features, device=device) * 0.02

            def product():
                F.linear(x, w)[0, 0].item()  # reading one value waits for the device

            product()  # warm-up
            repeats, start = 0, time.perf_counter()
            while repeats < 10 or time.perf_counter() - start < 0.5:
                product()
                repeats += 1
            seconds = (time.perf_counter() - start) / repeats
            gflops = 2 * rows * in_features * out_features / seconds / 1e9
            print(f"  {name:<20} {rows} x {in_features} . ({out_features} x {in_features})^T: "
                  f"{seconds * 1e6:8.1f} us, {gflops:6.1f} GFLOP/s, x{per_step} a step")
            step_seconds += seconds * per_step
    print(f"impl=torch rows={rows} products_per_step_ms={step_seconds * 1e3:.2f} "
          f"tokens_per_s_if_only_products={rows / step_seconds:.1f}")


if __name__ == "__main__":
    main()
