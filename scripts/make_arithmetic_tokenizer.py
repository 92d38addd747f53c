#!/usr/bin/env python3
"""Trains the small BPE tokenizer of the built-in arithmetic task and writes it to
recipes/assets/arithmetic-tokenizer/ (tokenizer.json, tokenizer_config.json).

    cargo build -p trainer-cli && python3 scripts/make_arithmetic_tokenizer.py

Digits are split one by one, so numbers are spelled digit by digit; the corpus is the
task's own text in both styles (made by `trainer data arithmetic`).
"""
import json
import os
import subprocess
import tempfile

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers

OUT = os.path.join("recipes", "assets", "arithmetic-tokenizer")
CHATML = (
    "{% for message in messages %}"
    "{{ '<|im_start|>' + message['role'] + '\n' + message['content'] + '<|im_end|>' + '\n' }}"
    "{% endfor %}"
    "{% if add_generation_prompt %}{{ '<|im_start|>assistant\n' }}{% endif %}"
)


def corpus():
    texts = []
    with tempfile.TemporaryDirectory() as tmp:
        for style in ["verbose", "concise"]:
            path = os.path.join(tmp, f"{style}.jsonl")
            subprocess.run(["./target/debug/trainer", "data", "arithmetic", "--count", "3000",
                            "--style", style, "--seed", "12345", "--out", path], check=True)
            for line in open(path):
                record = json.loads(line)
                texts.append(record["prompt"] + record["response"])
    return texts


def main():
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True),
        pre_tokenizers.ByteLevel(add_prefix_space=False),
    ])
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    specials = ["<|endoftext|>", "<|im_start|>", "<|im_end|>"]
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(corpus(), trainer)
    os.makedirs(OUT, exist_ok=True)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    config = {"eos_token": "<|endoftext|>", "pad_token": "<|endoftext|>", "bos_token": None,
              "chat_template": CHATML, "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"vocabulary {tok.get_vocab_size()} -> {OUT}")


if __name__ == "__main__":
    main()
