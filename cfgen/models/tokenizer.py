"""A CLIP tokenizer built offline for the tiny model.

Real runs load SD's own CLIP tokenizer with the pipeline. For the tiny model no vocabulary can be downloaded, so we
train a byte-level BPE on the words our prompt templates use: each such word becomes one token (prompts stay far
below CLIP's 77-token limit) while any other text still tokenizes, byte by byte.
"""

from __future__ import annotations

import json

from tokenizers import Tokenizer, models, pre_tokenizers, trainers
from transformers import CLIPTokenizer

#: Words of the prompt templates (cfgen.io.prompts) and of common radiology captions.
DOMAIN_WORDS = (
    "a an the of and with without possible patient year old female male smoker non chest x ray xray showing "
    "normal no significant findings finding support devices device pleural effusion cardiomegaly enlarged "
    "cardiomediastinum lung opacity lesion edema consolidation pneumonia atelectasis pneumothorax other fracture "
    "pacemaker left right frontal lateral view pa ap"
).split()


def build_domain_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    bpe = Tokenizer(models.BPE(end_of_word_suffix="</w>", continuing_subword_prefix=""))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(
        vocab_size=10_000, initial_alphabet=alphabet, end_of_word_suffix="</w>", show_progress=False
    )
    # One word per sentence, as CLIP's pre-tokenizer splits on whitespace before byte-level mapping.
    bpe.train_from_iterator(DOMAIN_WORDS, trainer)
    learned = json.loads(bpe.to_str())["model"]

    vocab: dict[str, int] = {}
    for symbol in sorted(alphabet) + [s + "</w>" for s in sorted(alphabet)] + list(learned["vocab"]):
        vocab.setdefault(symbol, len(vocab))
    # CLIP puts the special tokens at the top of the vocabulary; pipelines rely on eos being the highest id.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    merges = [tuple(m) for m in learned["merges"]]
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
