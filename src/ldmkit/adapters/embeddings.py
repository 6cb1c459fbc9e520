"""Textual inversion (Gal et al. 2022): new tokens whose embedding vectors are learned (or loaded) while
the text encoder stays frozen.

A token with n vectors becomes n tokenizer entries, `tok tok_1 ... tok_{n-1}`, and a prompt's `tok` is
expanded to them before tokenisation -- diffusers' `load_textual_inversion` convention, so a prompt
gives the same ids here and there. The vectors live in `TokenEmbedding.extra`, beside the frozen
table: training them trains nothing else.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ldmkit.errors import UserError


class TokenEmbedding(nn.Module):
    """A frozen embedding table [V, d] followed by added rows `extra` [n, d] for ids V .. V + n - 1."""

    def __init__(self, base: nn.Embedding):
        super().__init__()
        self.base = base
        self.extra = nn.Parameter(base.weight.new_zeros(0, base.embedding_dim), requires_grad=False)

    @property
    def num_embeddings(self) -> int:
        return self.base.num_embeddings + self.extra.shape[0]

    @property
    def embedding_dim(self) -> int:
        return self.base.embedding_dim

    @property
    def weight(self) -> torch.Tensor:  # what transformers' get_input_embeddings().weight users read
        return torch.cat([self.base.weight, self.extra.to(self.base.weight.dtype)])

    def add(self, vectors: torch.Tensor, trainable: bool = False) -> None:
        rows = vectors.to(self.base.weight.device, self.base.weight.dtype)
        keep = self.extra.detach()
        self.extra = nn.Parameter(torch.cat([keep, rows]), requires_grad=trainable or self.extra.requires_grad)

    def forward(self, ids: torch.Tensor) -> torch.Tensor:
        v = self.base.num_embeddings
        out = self.base(ids.clamp(max=v - 1))
        new = ids >= v
        if self.extra.shape[0] and bool(new.any()):
            added = F.embedding((ids - v).clamp(min=0), self.extra).to(out.dtype)
            out = torch.where(new[..., None], added, out)
        return out


def token_names(token: str, n: int) -> list[str]:
    """The tokenizer entries of a token with `n` vectors (diffusers' naming)."""
    return [token] + [f"{token}_{i}" for i in range(1, n)]


def add_token(conditioner, token: str, vectors: torch.Tensor, trainable: bool = False, source: str = "") -> list[str]:
    """Teach `conditioner` (a frozen transformers text encoder: CLIP or BERT) the token `token` with
    `vectors` [n, d]; returns its tokenizer entries. A token the vocabulary already has, or vectors
    of another width than the encoder's, is an error naming both."""
    tokenizer, model = getattr(conditioner, "tokenizer", None), getattr(conditioner, "model", None)
    if tokenizer is None or model is None or not hasattr(model, "get_input_embeddings"):
        raise UserError(f"embedding {source}: textual inversion needs a transformers text encoder (CLIP, BERT); "
                        f"this model's conditioner is {type(conditioner).__name__}")
    if not token or any(c.isspace() for c in token):
        raise UserError(f"embedding {source}: token {token!r} must be one word without spaces")
    table = model.get_input_embeddings()
    width = table.embedding_dim
    if vectors.dim() != 2 or vectors.shape[1] != width:
        raise UserError(f"embedding {source}: vectors of width {vectors.shape[-1]} do not fit this text encoder, "
                        f"whose token embeddings have width {width} (an embedding for another model?)")
    names = token_names(token, vectors.shape[0])
    vocab = tokenizer.get_vocab()
    taken = [n for n in names if n in vocab or n.lower() in vocab and getattr(tokenizer, "do_lower_case", False)]
    if taken:
        raise UserError(f"embedding {source}: token {taken[0]!r} is already in the tokenizer's vocabulary; choose "
                        "another trigger word (e.g. `--embedding FILE:<my-token>`)")
    if not isinstance(table, TokenEmbedding):
        table = TokenEmbedding(table)
        model.set_input_embeddings(table)
    first = len(tokenizer)
    if first != table.num_embeddings:
        raise UserError(f"embedding {source}: the tokenizer has {first} entries but the text encoder embeds "
                        f"{table.num_embeddings}; they must agree before tokens are added")
    tokenizer.add_tokens(names)
    ids = tokenizer.convert_tokens_to_ids(names)
    if ids != list(range(first, first + len(names))):
        raise UserError(f"embedding {source}: the tokenizer gave {token!r} ids {ids}, not new ones")
    table.add(vectors, trainable=trainable)
    expansions = getattr(conditioner, "expansions", None)
    if expansions is not None and len(names) > 1:
        expansions[token] = " ".join(names)
    if hasattr(conditioner, "_cache"):
        conditioner._cache = {}
    return names


def expand_prompt(prompt: str, expansions: dict[str, str]) -> str:
    """A multi-vector token written once in a prompt becomes its n entries (diffusers' replacement)."""
    for token, replacement in expansions.items():
        prompt = prompt.replace(token, replacement)
    return prompt


def learned_vectors(conditioner, token: str) -> torch.Tensor:
    """The current vectors [n, d] of an added token (float32, CPU copy)."""
    table = conditioner.model.get_input_embeddings()
    n = len(conditioner.expansions.get(token, token).split())
    first = conditioner.tokenizer.convert_tokens_to_ids(token) - table.base.num_embeddings
    return table.extra[first:first + n].detach().float().cpu().clone()


def init_vectors(conditioner, init_word: str, n: int) -> torch.Tensor:
    """Start vectors for a new token: the embedding of `init_word` (its first sub-word), repeated."""
    ids = conditioner.tokenizer(init_word, add_special_tokens=False)["input_ids"]
    if not ids:
        raise UserError(f"--init-word {init_word!r} gives no token")
    if len(ids) > 1:
        import warnings

        warnings.warn(f"--init-word {init_word!r} is {len(ids)} tokens; starting from the first", stacklevel=2)
    row = conditioner.model.get_input_embeddings().weight[ids[0]].detach().float()
    return row[None].repeat(n, 1)


__all__ = ["TokenEmbedding", "add_token", "expand_prompt", "init_vectors", "learned_vectors", "token_names"]
