#!/usr/bin/env python3
"""Builds the text corpus of the skipgpt recipe and its tokenizer:

- recipes/data/kjv-corpus.txt: Genesis, Exodus, Ruth, Proverbs and Ecclesiastes of the King James
  Version (1611; public domain), one verse per line, a blank line between chapters. Source: the
  Debian package `bible-kjv-text` 4.38 (`/usr/lib/bible.data`), read with the `bible` program of
  package `bible-kjv` 4.38.
- recipes/assets/kjv-tokenizer/: a byte-level BPE tokenizer (vocabulary 2048) trained on it.

    python3 scripts/make_kjv_corpus.py      # needs apt-get (download only) and `tokenizers`
"""
import glob
import json
import os
import re
import subprocess
import tempfile

from bpe_tokenizer import save_byte_level_bpe

BOOKS = ["Genesis", "Exodus", "Ruth", "Proverbs", "Ecclesiastes"]
CORPUS = os.path.join("recipes", "data", "kjv-corpus.txt")
TOKENIZER = os.path.join("recipes", "assets", "kjv-tokenizer")


def dump_books():
    with tempfile.TemporaryDirectory() as tmp:
        for package in ["bible-kjv-text=4.38", "bible-kjv=4.38"]:
            subprocess.run(["apt-get", "download", package], cwd=tmp, check=True)
        for deb in glob.glob(os.path.join(tmp, "*.deb")):
            subprocess.run(["dpkg-deb", "-x", deb, os.path.join(tmp, "root")], check=True)
        root = os.path.join(tmp, "root", "usr")
        chapters = []
        for book in BOOKS:
            text = subprocess.run(
                [os.path.join(root, "bin", "bible"), "-p", os.path.join(root, "lib"), "-l100000",
                 f"{book} 1:1-{book} 200:200"],
                check=True, capture_output=True, text=True).stdout
            verses = []
            for line in text.splitlines():
                match = re.match(r"^\s*\d+ (.*)$", line)
                if match:
                    verses.append(match.group(1).strip())
                elif re.match(rf"^{book} \d+$", line.strip()) and verses:
                    chapters.append("\n".join(verses))
                    verses = []
            chapters.append("\n".join(verses))
    return "\n\n".join(chapters) + "\n"


def main():
    text = dump_books()
    with open(CORPUS, "w") as f:
        f.write(text)
    print(f"{len(text)} characters -> {CORPUS}")
    save_byte_level_bpe(text.split("\n\n"), TOKENIZER, vocab_size=2048,
                        specials=["<|endoftext|>"])


if __name__ == "__main__":
    main()
