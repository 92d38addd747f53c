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

from bpe_tokenizer import save_byte_level_bpe

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
    save_byte_level_bpe(corpus(), OUT, vocab_size=384,
                        specials=["<|endoftext|>", "<|im_start|>", "<|im_end|>"],
                        split_digits=True, chat_template=CHATML)


if __name__ == "__main__":
    main()
