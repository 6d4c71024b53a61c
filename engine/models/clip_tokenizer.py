"""The CLIP BPE tokenizer, built offline from the vocabulary open_clip ships.

SD 1.x and SD 2.x both use OpenAI's CLIP BPE vocabulary (49408 tokens); they differ only in
the padding token (SD1 pads with <|endoftext|>, SD2 with "!" = id 0, as ComfyUI does).
"""

from __future__ import annotations

import functools
import gzip
import os

START, END = "<|startoftext|>", "<|endoftext|>"


def _bytes_to_unicode() -> dict[int, str]:
    bs = list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    cs = bs[:]
    n = 0
    for b in range(256):
        if b not in bs:
            bs.append(b)
            cs.append(256 + n)
            n += 1
    return dict(zip(bs, [chr(c) for c in cs]))


@functools.lru_cache(maxsize=1)
def clip_vocab_and_merges() -> tuple[dict[str, int], list[str]]:
    """CLIP's vocab and merges, identical to openai/clip-vit-large-patch14's tokenizer files."""
    import open_clip

    path = os.path.join(os.path.dirname(open_clip.__file__), "bpe_simple_vocab_16e6.txt.gz")
    lines = gzip.open(path).read().decode("utf-8").split("\n")
    merges = lines[1 : 49152 - 256 - 2 + 1]
    units = list(_bytes_to_unicode().values())
    vocab_list = units + [u + "</w>" for u in units] + ["".join(m.split()) for m in merges] + [START, END]
    return {tok: i for i, tok in enumerate(vocab_list)}, merges


def clip_tokenizer(pad: str = END, max_length: int = 77):
    """A transformers CLIPTokenizer with the real CLIP vocabulary, without any download."""
    from transformers import CLIPTokenizer

    vocab, merges = clip_vocab_and_merges()
    tok = CLIPTokenizer(vocab=dict(vocab), merges=[tuple(m.split()) for m in merges], pad_token=pad)
    tok.model_max_length = max_length
    return tok


def in_vocabulary(word: str) -> bool:
    """True if `word` is a single whole token of the CLIP vocabulary (so it cannot be a new token)."""
    vocab, _ = clip_vocab_and_merges()
    w = word.lower()
    return w in vocab or (w + "</w>") in vocab
