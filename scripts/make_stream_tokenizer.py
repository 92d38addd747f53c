#!/usr/bin/env python3
"""Writes the word-level tokenizer of the built-in stream task (tays) to
recipes/assets/stream-tokenizer/ (tokenizer.json, tokenizer_config.json).

    python3 scripts/make_stream_tokenizer.py

The task's language is a closed set of words (datasets/src/stream.rs): colours, cell numbers,
the three events and the three questions; one token per word keeps every observation short.
Special tokens: end of text, `<unit>` (opens a reasoning unit), `<sep>` (closes it), `<skip>`
(a unit with nothing to say). A test tokenizes the task's texts and refuses unknown words.
"""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers

OUT = os.path.join("recipes", "assets", "stream-tokenizer")
SPECIALS = ["<|endoftext|>", "<unit>", "<sep>", "<skip>", "[UNK]"]
COLOURS = ["red", "green", "blue", "yellow", "white"]
WORDS = COLOURS + [str(d) for d in range(10)] + [
    "appears", "moves", "turns", "at", "to",
    "how", "many", "where", "is", "the", "one", "which", "appeared", "first", "?",
]


def main():
    vocab = {token: i for i, token in enumerate(SPECIALS + WORDS)}
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    tok.decoder = decoders.WordPiece(prefix="##", cleanup=False)
    tok.add_special_tokens(SPECIALS[:4])
    os.makedirs(OUT, exist_ok=True)
    tok.save(os.path.join(OUT, "tokenizer.json"))
    config = {"eos_token": SPECIALS[0], "pad_token": SPECIALS[0], "bos_token": None,
              "unk_token": "[UNK]", "tokenizer_class": "PreTrainedTokenizerFast"}
    with open(os.path.join(OUT, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"vocabulary {tok.get_vocab_size()} -> {OUT}")


if __name__ == "__main__":
    main()
