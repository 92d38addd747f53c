#!/usr/bin/env python3
"""Trains the small BPE tokenizer of the built-in visual question task (rendered shapes) and
writes it to recipes/assets/shapes-tokenizer/ (tokenizer.json, tokenizer_config.json).

    cargo build --release -p trainer-cli && python3 scripts/make_shapes_tokenizer.py

The corpus is the task's own questions and answers (made by `trainer data shapes`); `<image>`
is a special token, the placeholder each prompt holds where the image's visual tokens go.
"""
import json
import os
import subprocess
import tempfile

from bpe_tokenizer import save_byte_level_bpe

OUT = os.path.join("recipes", "assets", "shapes-tokenizer")


def corpus():
    with tempfile.TemporaryDirectory() as tmp:
        subprocess.run(["./target/release/trainer", "data", "shapes", "--count", "3000",
                        "--seed", "12345", "--out", tmp], check=True)
        texts = []
        for line in open(os.path.join(tmp, "questions.jsonl")):
            record = json.loads(line)
            texts.append(record["prompt"].replace("<image>", "") + record["answer"])
        return texts


def main():
    save_byte_level_bpe(corpus(), OUT, vocab_size=420, specials=["<|endoftext|>", "<image>"],
                        split_digits=True)


if __name__ == "__main__":
    main()
