#!/usr/bin/env python3
"""Builds the Hugging Face parity fixtures in tests/fixtures/hf/ with `transformers`.

Run from the repository root (any machine with torch + transformers, CPU is enough):

    python3 scripts/make_hf_fixtures.py

For each tiny random model it writes a Hugging Face folder (config.json, weights,
tokenizer.json, tokenizer_config.json) and `reference.safetensors` + `reference.json`:
input ids, logits of each single sequence, logits of the left-padded batch, and the
greedy continuations that `transformers.generate` produces. The Rust tests compare against
these; they never call Python.
"""
import copy
import json
import os
import shutil
import sys

import torch
import transformers
from safetensors.torch import save_file
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = os.path.join("tests", "fixtures", "hf")
VOCAB_SIZE = 320
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)
CORPUS = [
    "The quick brown fox jumps over the lazy dog.",
    "Tom has 3 apples and buys 12 more. How many apples does Tom have? 3 + 12 = 15. #### 15",
    "A train travels 60 miles per hour for 2 hours, so it covers 120 miles.",
    "Attention is computed from queries, keys and values; rotary positions rotate them.",
    "Caf\u00e9 na\u00efve \u00fcber \u65e5\u672c\u8a9e emoji \U0001f600 numbers 1,000 and 2.5e3.",
] * 20
PROMPTS = ["Tom has 3 apples and buys 12 more.", "The quick fox"]
NEW_TOKENS = 12
# Large random weights make greedy continuations wander instead of repeating one token.
INIT_RANGE = 0.5

# name -> (architecture, config kwargs, stored dtype, shard?)
MODELS = {
    "llama-gqa": (
        "llama",
        dict(hidden_size=64, intermediate_size=96, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=2, head_dim=32, tie_word_embeddings=False, rope_theta=10000.0,
             rms_norm_eps=1e-6),
        torch.float32, False),
    "llama3-tied-bf16-sharded": (
        "llama",
        dict(hidden_size=48, intermediate_size=80, num_hidden_layers=3, num_attention_heads=3,
             num_key_value_heads=3, tie_word_embeddings=True, rope_theta=500000.0,
             rms_norm_eps=1e-5,
             rope_scaling=dict(rope_type="llama3", factor=8.0, low_freq_factor=1.0,
                               high_freq_factor=4.0, original_max_position_embeddings=16)),
        torch.bfloat16, True),
    "qwen2-gqa-tied-f16": (
        "qwen2",
        dict(hidden_size=48, intermediate_size=72, num_hidden_layers=2, num_attention_heads=6,
             num_key_value_heads=2, tie_word_embeddings=True, rope_theta=1000000.0,
             rms_norm_eps=1e-6),
        torch.float16, False),
    "qwen2-mqa": (
        "qwen2",
        dict(hidden_size=32, intermediate_size=64, num_hidden_layers=2, num_attention_heads=4,
             num_key_value_heads=1, tie_word_embeddings=False, rope_theta=10000.0,
             rms_norm_eps=1e-6),
        torch.float32, False),
}


def build_tokenizer(path):
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=VOCAB_SIZE, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(CORPUS, trainer)
    tok.save(path)
    return tok


def write_tokenizer_config(folder):
    config = {
        "bos_token": None,
        "eos_token": "<|im_end|>",
        "pad_token": "<|endoftext|>",
        "chat_template": CHATML,
        "model_max_length": 256,
        "tokenizer_class": "PreTrainedTokenizerFast",
    }
    with open(os.path.join(folder, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)


def make_model(arch, kwargs, seed):
    torch.manual_seed(seed)
    common = dict(vocab_size=VOCAB_SIZE, max_position_embeddings=256, initializer_range=INIT_RANGE,
                  bos_token_id=0, eos_token_id=2, pad_token_id=0)
    if arch == "llama":
        config = transformers.LlamaConfig(**common, **kwargs)
        model = transformers.LlamaForCausalLM(config)
    else:
        config = transformers.Qwen2Config(**common, **kwargs)
        model = transformers.Qwen2ForCausalLM(config)
    # Norm weights start at 1 and biases at 0: perturb them so loading them is tested too.
    with torch.no_grad():
        for name, param in model.named_parameters():
            if "norm" in name:
                param.add_(0.2 * torch.randn_like(param))
            elif name.endswith("bias"):
                param.copy_(0.1 * torch.randn_like(param))
    return model.eval()


def left_pad(seqs, pad_id):
    width = max(len(s) for s in seqs)
    ids = torch.tensor([[pad_id] * (width - len(s)) + s for s in seqs])
    mask = torch.tensor([[0] * (width - len(s)) + [1] * len(s) for s in seqs])
    positions = (mask.cumsum(-1) - 1).clamp(min=0)
    return ids, mask, positions


def main():
    os.makedirs(OUT, exist_ok=True)
    scratch = os.path.join(OUT, "_tokenizer.json")
    tok = build_tokenizer(scratch)
    prompt_ids = [tok.encode(p).ids for p in PROMPTS]
    for seed, (name, (arch, kwargs, dtype, shard)) in enumerate(MODELS.items()):
        folder = os.path.join(OUT, name)
        shutil.rmtree(folder, ignore_errors=True)
        model = make_model(arch, kwargs, seed)
        # Round the weights (not the buffers: the rotary frequencies stay f32, as after a
        # fresh load) to the stored dtype, so the f32 reference uses exactly the file's values.
        with torch.no_grad():
            for param in model.parameters():
                param.copy_(param.to(dtype).to(torch.float32))
        copy.deepcopy(model).to(dtype).save_pretrained(
            folder, max_shard_size="60KB" if shard else "100MB")
        shutil.copy(scratch, os.path.join(folder, "tokenizer.json"))
        write_tokenizer_config(folder)

        reference = {}
        with torch.no_grad():
            for i, ids in enumerate(prompt_ids):
                out = model(torch.tensor([ids]))
                reference[f"single_{i}_logits"] = out.logits[0].contiguous()
            ids, mask, positions = left_pad(prompt_ids, pad_id=0)
            out = model(ids, attention_mask=mask, position_ids=positions)
            reference["batch_logits"] = out.logits.contiguous()
            greedy_single = []
            for ids_one in prompt_ids:
                gen = model.generate(torch.tensor([ids_one]), max_new_tokens=NEW_TOKENS,
                                     do_sample=False, eos_token_id=None, pad_token_id=0)
                greedy_single.append(gen[0, len(ids_one):].tolist())
            gen = model.generate(ids, attention_mask=mask, max_new_tokens=NEW_TOKENS,
                                 do_sample=False, eos_token_id=None, pad_token_id=0)
            greedy_batch = gen[:, ids.shape[1]:].tolist()
        save_file(reference, os.path.join(folder, "reference.safetensors"))
        meta = {
            "prompts": PROMPTS,
            "prompt_ids": prompt_ids,
            "batch_input_ids": ids.tolist(),
            "batch_attention_mask": mask.tolist(),
            "greedy_single": greedy_single,
            "greedy_batch": greedy_batch,
            "stored_dtype": str(dtype).replace("torch.", ""),
            "made_with": {"torch": torch.__version__, "transformers": transformers.__version__},
        }
        with open(os.path.join(folder, "reference.json"), "w") as f:
            json.dump(meta, f, indent=1)
        print(f"{name}: {sum(p.numel() for p in model.parameters())} parameters", file=sys.stderr)
    os.remove(scratch)


if __name__ == "__main__":
    main()
