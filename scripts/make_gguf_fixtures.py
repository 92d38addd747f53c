#!/usr/bin/env python3
"""Builds the GGUF fixtures in tests/fixtures/gguf/ with the `gguf` package and `transformers`.

Run from the repository root (CPU is enough; needs numpy, gguf, torch, transformers):

    python3 scripts/make_gguf_fixtures.py                      # tiny fixtures, committed
    python3 scripts/make_gguf_fixtures.py --smollm2 models/SmolLM2-135M-Instruct.Q4_1.gguf

Outputs:
- `dequant.gguf` + `dequant.json`: one small tensor per supported type (F32, F16, BF16, Q8_0,
  Q4_0, Q4_1, Q4_K, Q6_K) and the values the `gguf` package dequantizes them to.
- `tiny-llama.gguf` + `tiny-llama-reference.json`: a 2-layer Llama whose weights mix every
  supported type, with a byte-level BPE vocabulary, merges and a ChatML template; the reference
  holds the logits and token ids `transformers` computes when it loads this GGUF itself.
- with `--smollm2`: `smollm2-reference.json`, the same reference for SmolLM2-135M-Instruct (the
  test that uses it runs once `scripts/get-smollm2` has imported the model).
The Rust tests read these files; they never call Python.
"""
import argparse
import json
import os
import shutil
import tempfile

import numpy as np
import torch
import transformers
import gguf
from gguf import GGMLQuantizationType as Q
from gguf.quants import dequantize, quantize

OUT = os.path.join("tests", "fixtures", "gguf")
TYPES = [Q.F32, Q.F16, Q.BF16, Q.Q8_0, Q.Q4_0, Q.Q4_1, Q.Q4_K, Q.Q6_K]
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
# Strings whose token ids must agree with transformers': unicode, digits, spaces, specials.
TOKENIZER_STRINGS = [
    "Hello world",
    "Tom has 3 apples and buys 12 more. 3 + 12 = 15",
    "  leading spaces and\ttabs\nnew lines\n\n",
    "Caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e emoji \U0001f600 1,000 2.5e3",
    "<|im_start|>user\nWhat is 2+2?<|im_end|>\n<|im_start|>assistant\n",
    "don't won't I'll we've they're",
]
CHAT = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is 7 times 6?"},
]

rng = np.random.default_rng(0)


def f16_bytes(values):
    return np.asarray(values, dtype=np.float16).view(np.uint8).reshape(-1, 2)


def k_quant_blocks(qtype, rows, cols):
    """Random but valid K-quant blocks: `gguf` can dequantize K-quants but not quantize to them.
    The f16 super-block scales are set small so the weights look like a trained model's."""
    block_size, type_size = gguf.GGML_QUANT_SIZES[qtype]
    blocks = rows * cols // block_size
    raw = rng.integers(0, 256, size=(blocks, type_size), dtype=np.uint8)
    if qtype == Q.Q4_K:  # d, dmin, scales[12], qs[128]
        raw[:, 0:2] = f16_bytes(rng.uniform(5e-5, 1.5e-4, blocks))
        raw[:, 2:4] = f16_bytes(rng.uniform(5e-5, 1.5e-4, blocks))
    elif qtype == Q.Q6_K:  # ql[128], qh[64], scales[16] (int8), d
        raw[:, 208:210] = f16_bytes(rng.uniform(1e-5, 3e-5, blocks))
    else:
        raise ValueError(qtype)
    return raw.reshape(rows, cols // block_size * type_size)


def encode(qtype, weights):
    """`weights` [rows, cols] float32 -> (array for GGUFWriter.add_tensor, raw_dtype)."""
    if qtype == Q.F32:
        return weights.astype(np.float32), None
    if qtype == Q.F16:
        return weights.astype(np.float16), None
    if qtype in (Q.Q4_K, Q.Q6_K):
        rows, cols = weights.shape
        return k_quant_blocks(qtype, rows, cols), qtype
    return quantize(weights.astype(np.float32), qtype), qtype


def make_dequant_fixture():
    path = os.path.join(OUT, "dequant.gguf")
    writer = gguf.GGUFWriter(path, "dequant-test")
    for qtype in TYPES:
        data, raw = encode(qtype, rng.normal(0, 0.05, size=(2, 512)).astype(np.float32))
        writer.add_tensor(qtype.name.lower(), data, raw_dtype=raw)
    write(writer)
    # Read the file back with the package's own reader, so the expectations describe the file.
    expected = {}
    for tensor in gguf.GGUFReader(path).tensors:
        values = dequantize(tensor.data, tensor.tensor_type).astype(np.float32)
        expected[tensor.name] = {
            "type": tensor.tensor_type.name,
            "shape": [int(d) for d in reversed(tensor.shape)],
            "values": values.reshape(-1).tolist(),
        }
    dump(expected, "dequant.json")


def write(writer):
    writer.write_header_to_file()
    writer.write_kv_data_to_file()
    writer.write_tensors_to_file()
    writer.close()


def dump(value, name):
    with open(os.path.join(OUT, name), "w") as f:
        json.dump(value, f)
    print("wrote", os.path.join(OUT, name))


def llama_cpp_permute(weights, heads):
    """What llama.cpp's converter does to q/k rows (interleaved rotary halves)."""
    rows = weights.shape[0]
    return (weights.reshape(heads, 2, rows // heads // 2, *weights.shape[1:])
            .swapaxes(1, 2).reshape(weights.shape))


def make_tiny_llama():
    hidden, ffn, layers, heads, kv_heads = 256, 256, 2, 4, 2
    head_dim = hidden // heads
    # The vocabulary of the HF fixtures: byte-level BPE with ChatML specials.
    tok = json.load(open(os.path.join("tests", "fixtures", "hf", "llama-gqa", "tokenizer.json")))
    vocab = tok["model"]["vocab"]
    tokens = [None] * len(vocab)
    for token, index in vocab.items():
        tokens[index] = token
    tokens.append("<think>")  # a user-defined (added, not special) token
    merges = [m if isinstance(m, str) else " ".join(m) for m in tok["model"]["merges"]]
    specials = {t["content"] for t in tok["added_tokens"]}
    token_types = [gguf.TokenType.CONTROL if t in specials else gguf.TokenType.NORMAL for t in tokens]
    token_types[-1] = gguf.TokenType.USER_DEFINED

    path = os.path.join(OUT, "tiny-llama.gguf")
    writer = gguf.GGUFWriter(path, "llama")
    writer.add_name("tiny-llama")
    writer.add_block_count(layers)
    writer.add_context_length(512)
    writer.add_embedding_length(hidden)
    writer.add_feed_forward_length(ffn)
    writer.add_head_count(heads)
    writer.add_head_count_kv(kv_heads)
    writer.add_rope_freq_base(10000.0)
    writer.add_layer_norm_rms_eps(1e-5)
    writer.add_rope_dimension_count(head_dim)
    writer.add_vocab_size(len(tokens))
    writer.add_tokenizer_model("gpt2")
    writer.add_tokenizer_pre("llama-bpe")
    writer.add_token_list(tokens)
    writer.add_token_types(token_types)
    writer.add_token_merges(merges)
    writer.add_bos_token_id(tokens.index("<|im_start|>"))
    writer.add_eos_token_id(tokens.index("<|im_end|>"))
    writer.add_pad_token_id(tokens.index("<|im_end|>"))
    writer.add_add_bos_token(False)
    writer.add_chat_template(CHATML)

    def normal(*shape, std=0.05):
        return rng.normal(0, std, size=shape).astype(np.float32)

    # Each weight in a different type, so the forward pass depends on every dequantizer.
    plan = [
        ("token_embd.weight", Q.Q8_0, normal(len(tokens), hidden, std=0.5)),
        ("output_norm.weight", Q.F32, 1 + normal(hidden, std=0.1)),
        ("output.weight", Q.Q6_K, normal(len(tokens), hidden)),
    ]
    layer_types = [
        [Q.Q4_0, Q.Q4_1, Q.Q8_0, Q.Q4_K, Q.Q6_K, Q.F16, Q.BF16],
        [Q.Q4_K, Q.Q6_K, Q.F32, Q.Q4_1, Q.Q4_0, Q.Q8_0, Q.Q6_K],
    ]
    for layer, (tq, tk, tv, to, tg, tu, td) in enumerate(layer_types):
        b = f"blk.{layer}"
        plan += [
            (f"{b}.attn_norm.weight", Q.F32, 1 + normal(hidden, std=0.1)),
            (f"{b}.ffn_norm.weight", Q.F32, 1 + normal(hidden, std=0.1)),
            (f"{b}.attn_q.weight", tq, llama_cpp_permute(normal(hidden, hidden), heads)),
            (f"{b}.attn_k.weight", tk, llama_cpp_permute(normal(kv_heads * head_dim, hidden), kv_heads)),
            (f"{b}.attn_v.weight", tv, normal(kv_heads * head_dim, hidden)),
            (f"{b}.attn_output.weight", to, normal(hidden, hidden)),
            (f"{b}.ffn_gate.weight", tg, normal(ffn, hidden)),
            (f"{b}.ffn_up.weight", tu, normal(ffn, hidden)),
            (f"{b}.ffn_down.weight", td, normal(hidden, ffn)),
        ]
    for name, qtype, weights in plan:
        if weights.ndim == 1:
            writer.add_tensor(name, weights)
        else:
            data, raw = encode(qtype, weights)
            writer.add_tensor(name, data, raw_dtype=raw)
    write(writer)
    reference(path, "tiny-llama-reference.json", logit_ids=None)


def reference(gguf_path, out_name, logit_ids):
    """Token ids and logits as `transformers` computes them from the GGUF file itself."""
    folder, file = os.path.dirname(os.path.abspath(gguf_path)), os.path.basename(gguf_path)
    tokenizer = transformers.AutoTokenizer.from_pretrained(folder, gguf_file=file)
    model = transformers.AutoModelForCausalLM.from_pretrained(
        folder, gguf_file=file, dtype=torch.float32)
    model.eval()
    chat_text = tokenizer.apply_chat_template(CHAT, tokenize=False, add_generation_prompt=True)
    chat_ids = tokenizer(chat_text, add_special_tokens=False)["input_ids"]
    with torch.no_grad():
        logits = model(torch.tensor([chat_ids])).logits[0]
    if logit_ids is None:
        logit_ids = list(range(logits.shape[-1]))
    top = torch.topk(logits, 5, dim=-1)
    greedy = model.generate(torch.tensor([chat_ids]), max_new_tokens=24, do_sample=False)
    dump({
        "strings": TOKENIZER_STRINGS,
        "string_ids": [tokenizer(s, add_special_tokens=False)["input_ids"] for s in TOKENIZER_STRINGS],
        "chat": CHAT,
        "chat_text": chat_text,
        "chat_ids": chat_ids,
        "logit_ids": logit_ids,
        "logits": [[round(v, 5) for v in row] for row in logits[:, logit_ids].tolist()],
        "top_ids": top.indices.tolist(),
        "top_logits": top.values.tolist(),
        "greedy_ids": greedy[0, len(chat_ids):].tolist(),
        "transformers": transformers.__version__,
        "gguf": gguf.__version__ if hasattr(gguf, "__version__") else "unknown",
    }, out_name)


def main():
    parser = argparse.ArgumentParser()
    parser.add_argument("--smollm2", help="path of SmolLM2-135M-Instruct.Q4_1.gguf")
    args = parser.parse_args()
    os.makedirs(OUT, exist_ok=True)
    if args.smollm2:
        # A spread of vocabulary columns (specials, common and rare ids) keeps the file small.
        reference(args.smollm2, "smollm2-reference.json", logit_ids=list(range(0, 49152, 97)))
        return
    make_dequant_fixture()
    make_tiny_llama()


if __name__ == "__main__":
    main()
