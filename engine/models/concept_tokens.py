"""New concept tokens in the text encoder: added words whose embedding rows train.

The text encoder's token embedding is wrapped by `ConceptEmbedding`: the original rows stay
frozen and untouched; the new rows are one small trainable parameter. So "train only the
concept rows" needs no gradient masking or row restoring, and the rows are exactly what is
exported as an embedding file (`embedding:<name>` in stock ComfyUI).

A concept may own several vectors: `<alice>` then stands for `<alice>` `<alice>_1` ... in the
tokenizer (prompts are expanded by `expand_prompt`), and the embedding file holds them all.
"""

from __future__ import annotations

import re

import torch
from torch import nn

from ..errors import UnconfusedError


class ConceptEmbedding(nn.Module):
    """Token embedding = frozen base rows + trainable new rows (ids >= base size)."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.base.requires_grad_(False)
        self.new_rows = nn.Parameter(torch.zeros(0, base.embedding_dim, dtype=torch.float32))

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.new_rows.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:
        return torch.cat([self.base.weight, self.new_rows.to(self.base.weight.dtype)])

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        n = self.base.num_embeddings
        out = self.base(ids.clamp(max=n - 1))
        is_new = ids >= n
        if self.new_rows.shape[0] and bool(is_new.any()):
            rows = self.new_rows[(ids - n).clamp(min=0, max=self.new_rows.shape[0] - 1)]
            out = torch.where(is_new[..., None], rows.to(out.dtype), out)
        return out

    def _apply(self, fn, recurse=True):
        """Casting the model (`.to(bf16)`) casts the frozen rows only: the new rows are what trains,
        and stay fp32 (on the module's device) - rounding them to half would lose their updates."""
        old = self.new_rows.data
        out = super()._apply(fn, recurse)
        if self.new_rows.dtype != torch.float32:
            self.new_rows.data = old.to(self.new_rows.device, torch.float32)
        return out

    def append(self, rows: torch.Tensor) -> None:
        data = torch.cat([self.new_rows.data, rows.to(self.new_rows.device, torch.float32)])
        self.new_rows = nn.Parameter(data, requires_grad=self.new_rows.requires_grad)


def _embeddings_module(text_encoder) -> nn.Module:
    tm = getattr(text_encoder, "text_model", text_encoder)
    return tm.embeddings


def concept_embedding(text_encoder) -> ConceptEmbedding:
    """The text encoder's ConceptEmbedding, installing it on first use."""
    emb = _embeddings_module(text_encoder)
    if not isinstance(emb.token_embedding, ConceptEmbedding):
        emb.token_embedding = ConceptEmbedding(emb.token_embedding)
    return emb.token_embedding


def vector_names(token: str, vectors: int) -> list[str]:
    return [token] + [f"{token}_{i}" for i in range(1, vectors)]


def add_concept_tokens(bundle, specs: list[tuple[str, str]], vectors: int = 1, *,
                       input: str = "concept_set") -> dict[str, list[int]]:
    """Add tokens (token, class word) to the bundle's tokenizer and text encoder, each row
    initialised from the class word's embedding (its tokens averaged). Tokens the bundle
    already has (e.g. from a CLIF text encoder upstream) are kept as they are."""
    if vectors < 1:
        raise UnconfusedError("vectors per token must be at least 1", input="vectors_per_token")
    from .families import family_of

    tok = bundle.tokenizer
    # every text encoder of the family gets the rows (SDXL: both); ids follow the first
    embs = [concept_embedding(te) for te in family_of(bundle).encoders(bundle).values()]
    emb = embs[0]
    for token, class_word in specs:
        if token in bundle.added_tokens:
            continue
        names = vector_names(token, vectors)
        if any(tok.convert_tokens_to_ids(n) != tok.unk_token_id for n in names if n in tok.get_vocab()):
            raise UnconfusedError(f"{token!r} is already in the tokenizer", input=input)
        class_ids = tok(class_word, add_special_tokens=False).input_ids
        if not class_ids:
            raise UnconfusedError(f"the class word {class_word!r} has no tokens", input=input)
        with torch.no_grad():
            inits = [e.base.weight[class_ids].float().mean(0, keepdim=True) for e in embs]
        added = tok.add_tokens(names)
        if added != len(names):
            raise UnconfusedError(f"could not add {token!r} to the tokenizer", input=input)
        ids = tok.convert_tokens_to_ids(names)
        if ids[0] != emb.num_embeddings:
            raise UnconfusedError(f"token ids out of step for {token!r} ({ids[0]} != {emb.num_embeddings})", input=input)
        for e, init in zip(embs, inits):
            e.append(init.repeat(len(names), 1))
        bundle.added_tokens[token] = list(ids)
    return {t: bundle.added_tokens[t] for t, _ in specs}


def token_rows(bundle, token: str, encoder: str = "text_encoder") -> torch.Tensor:
    """The embedding vectors [n, D] of an added token (in the bundle's text encoder `encoder`)."""
    emb = concept_embedding(getattr(bundle, encoder))
    base = emb.base.num_embeddings
    ids = bundle.added_tokens[token]
    return emb.new_rows.detach()[[i - base for i in ids]].clone()


def set_token_rows(bundle, token: str, rows: torch.Tensor, encoder: str = "text_encoder") -> None:
    emb = concept_embedding(getattr(bundle, encoder))
    base = emb.base.num_embeddings
    with torch.no_grad():
        for j, i in enumerate(bundle.added_tokens[token]):
            emb.new_rows[i - base] = rows[j].to(emb.new_rows)


def expand_prompt(bundle, prompt: str) -> str:
    """Spell out multi-vector tokens: '<alice>' -> '<alice> <alice>_1 <alice>_2'."""
    for token, ids in bundle.added_tokens.items():
        if len(ids) > 1:
            prompt = re.sub(rf"(?<!\S){re.escape(token)}(?!_\d)", " ".join(vector_names(token, len(ids))), prompt)
    return prompt


def unknown_tokens(bundle, prompt: str) -> list[str]:
    """Words shaped like concept tokens (<...>) that the bundle does not know."""
    return [w for w in re.findall(r"<[^<>\s]+>", prompt) if w not in bundle.added_tokens]
