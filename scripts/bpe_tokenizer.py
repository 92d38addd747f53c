"""The byte-level BPE tokenizers of the shipped tasks, trained and saved the same way
(imported by make_arithmetic_tokenizer.py, make_shapes_tokenizer.py, make_kjv_corpus.py)."""
import json
import os

from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers


def save_byte_level_bpe(texts, out, vocab_size, specials, split_digits=False, chat_template=None):
    """Trains a byte-level BPE on `texts` and writes tokenizer.json and tokenizer_config.json
    (end of text = the first special token) to the folder `out`."""
    tok = Tokenizer(models.BPE())
    byte_level = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.pre_tokenizer = (pre_tokenizers.Sequence([
        pre_tokenizers.Digits(individual_digits=True), byte_level]) if split_digits else byte_level)
    tok.decoder = decoders.ByteLevel()
    tok.post_processor = processors.ByteLevel(trim_offsets=False)
    trainer = trainers.BpeTrainer(vocab_size=vocab_size, special_tokens=specials,
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    os.makedirs(out, exist_ok=True)
    tok.save(os.path.join(out, "tokenizer.json"))
    config = {"eos_token": specials[0], "pad_token": specials[0], "bos_token": None}
    if chat_template:
        config["chat_template"] = chat_template
    config["tokenizer_class"] = "PreTrainedTokenizerFast"
    with open(os.path.join(out, "tokenizer_config.json"), "w") as f:
        json.dump(config, f, indent=2)
    print(f"vocabulary {tok.get_vocab_size()} -> {out}")
