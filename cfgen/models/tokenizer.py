"""A CLIP tokenizer built offline for the tiny model.

Real runs load SD's own CLIP tokenizer with the pipeline. For the tiny model no vocabulary can be downloaded, so we
learn byte-level BPE merges from the words our prompt templates use: each such word becomes one token (prompts stay
far below CLIP's 77-token limit) while any other text still tokenizes, byte by byte. The merges are learned by a
small deterministic loop rather than `tokenizers`' trainer, whose tie-breaking varies from run to run: the same
config must always build the same token ids, or a saved model and a rebuilt one would disagree.
"""

from __future__ import annotations

from collections import Counter

from tokenizers import pre_tokenizers
from transformers import CLIPTokenizer

#: Words of the prompt templates (cfgen.io.prompts) and of common radiology captions.
DOMAIN_WORDS = (
    "a an the of and with without possible patient year old female male smoker non chest x ray xray showing "
    "normal no significant findings finding support devices device pleural effusion cardiomegaly enlarged "
    "cardiomediastinum lung opacity lesion edema consolidation pneumonia atelectasis pneumothorax other fracture "
    "pacemaker left right frontal lateral view pa ap"
).split()

_END = "</w>"


def learn_merges(words: list[str]) -> list[tuple[str, str]]:
    """BPE merges until every word is one symbol: the most frequent pair first, ties broken by the pair itself."""
    corpus = [tuple(w[:-1]) + (w[-1] + _END,) for w in dict.fromkeys(words) if w]
    merges: list[tuple[str, str]] = []
    while True:
        pairs = Counter(pair for word in corpus for pair in zip(word, word[1:]))
        if not pairs:
            return merges
        best = min(pairs, key=lambda p: (-pairs[p], p))
        merges.append(best)
        merged = []
        for word in corpus:
            out, i = [], 0
            while i < len(word):
                if i + 1 < len(word) and (word[i], word[i + 1]) == best:
                    out.append(word[i] + word[i + 1])
                    i += 2
                else:
                    out.append(word[i])
                    i += 1
            merged.append(tuple(out))
        corpus = merged


def build_domain_tokenizer(model_max_length: int = 77) -> CLIPTokenizer:
    alphabet = sorted(pre_tokenizers.ByteLevel.alphabet())
    vocab: dict[str, int] = {}
    for symbol in alphabet + [s + _END for s in alphabet]:
        vocab.setdefault(symbol, len(vocab))
    merges = learn_merges(DOMAIN_WORDS)  # domain words are plain ASCII: their bytes are their characters
    for left, right in merges:
        vocab.setdefault(left + right, len(vocab))
    # CLIP puts the special tokens at the top of the vocabulary; pipelines rely on eos being the highest id.
    vocab["<|startoftext|>"] = len(vocab)
    vocab["<|endoftext|>"] = len(vocab)
    return CLIPTokenizer(vocab=vocab, merges=merges, model_max_length=model_max_length)
