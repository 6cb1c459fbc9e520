"""AUTOMATIC1111's prompt syntax: attention weights, 75-token chunks, BREAK.

    parse_prompt_attention("a (red:1.3) [circle]")  ->  [("a ", 1.0), ("red", 1.3), (" ", 1.0), ("circle", 1/1.1)]

* ``(text)`` multiplies the weight of ``text`` by 1.1, ``(text:1.3)`` by 1.3, ``[text]`` divides it
  by 1.1; brackets nest (their factors multiply) and an unclosed bracket applies to the end.
  ``\\(``, ``\\)``, ``\\[``, ``\\]`` and ``\\\\`` are the literal characters. ``BREAK`` (upper case, a
  word of its own) starts a new chunk, inside brackets too (where A1111 reads it as a word).
* A prompt becomes chunks of at most 75 tokens (``length``), each encoded as its own
  ``[BOS] tokens [EOS] [PAD]...`` row of 77 and concatenated along the token axis, so prompts have
  no length limit (A1111's sd_hijack_clip). A chunk that fills up moves the words after its last
  comma, when that comma is at most 20 tokens back, into the next chunk.
* Weights act on the encoder's output: each chunk's hidden states are multiplied per token by its
  weight, then rescaled so that the chunk's mean is what it was before (A1111's "Original"
  emphasis).

Encoders call `encode_weighted` with their tokenizer (`Tokens`) and a function that runs the
network on a batch of rows; `pipelines` reaches them through `encode_prompts`. A prompt without
syntax that fits one row is encoded exactly as before (the encoders keep their plain path for it).
"""
from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Callable

import torch

from ldmkit.conditioning.base import Conditioning, warn_truncated

ROUND, SQUARE = 1.1, 1 / 1.1  # the factors of (text) and [text]
CHUNK = 75  # tokens per chunk between [BOS] and [EOS] for CLIP's 77 positions
COMMA_BACKTRACK = 20  # a full chunk moves the words after a comma at most this far back to the next one
BREAK = ("BREAK", -1.0)  # the marker parse_prompt_attention puts where BREAK was

_TOKEN = re.compile(r"""
    \\[()\[\]\\]                                   # an escaped bracket or backslash
  | \\                                             # a lone backslash (dropped)
  | \( | \[                                        # opening brackets
  | :(?P<weight>[+-]?(?:\d+\.?\d*|\.\d+))\)       # ":1.3)" closes a round bracket with a weight
  | \) | \]                                        # closing brackets
  | [^\\()\[\]:]+                                  # plain text
  | :                                              # a colon that is plain text
""", re.X)
_BREAK = re.compile(r"\s*\bBREAK\b\s*", re.S)


def parse_prompt_attention(text: str) -> list[tuple[str, float]]:
    """The prompt as (text, weight) runs, neighbours of equal weight merged; BREAK gives ("BREAK", -1)."""
    out: list[list] = []
    opened = {"(": [], "[": []}  # the index in `out` where each open bracket starts

    def scale(start: int, factor: float) -> None:
        for run in out[start:]:
            if tuple(run) != BREAK:  # A1111 scales the marker too, turning it into the word "BREAK"
                run[1] *= factor

    for m in _TOKEN.finditer(text):
        tok, weight = m.group(0), m.group("weight")
        if tok.startswith("\\"):
            out.append([tok[1:], 1.0])
        elif tok in ("(", "["):
            opened[tok].append(len(out))
        elif weight is not None and opened["("]:
            scale(opened["("].pop(), float(weight))
        elif tok == ")" and opened["("]:
            scale(opened["("].pop(), ROUND)
        elif tok == "]" and opened["["]:
            scale(opened["["].pop(), SQUARE)
        else:  # text, or a bracket that closes nothing
            for i, part in enumerate(_BREAK.split(tok)):
                if i:
                    out.append(list(BREAK))
                out.append([part, 1.0])
    for start in opened["("]:
        scale(start, ROUND)
    for start in opened["["]:
        scale(start, SQUARE)
    return _merge(out or [["", 1.0]])


def _merge(runs: list[list]) -> list[tuple[str, float]]:
    merged: list[list] = []
    for text, weight in runs:
        if merged and merged[-1][1] == weight:
            merged[-1][0] += text
        else:
            merged.append([text, weight])
    return [(t, w) for t, w in merged]


def is_plain(text: str) -> bool:
    """True when the syntax changes nothing: one run of weight 1 that is the prompt itself."""
    parsed = parse_prompt_attention(text)
    return len(parsed) == 1 and parsed[0] == (text, 1.0)


def strip_syntax(text: str) -> str:
    """The prompt's words without brackets, weights or BREAK (what word-level encoders read)."""
    return " ".join(t for t, w in parse_prompt_attention(text) if (t, w) != BREAK)


# ------------------------------------------------------------------------------------------------ chunks
@dataclass
class Tokens:
    """What `encode_weighted` needs from a tokenizer: `tokenize` (texts -> token ids without special
    tokens), the special ids, the comma's id (None: no comma backtrack), the body length of one row
    (positions - 2) and `max_chunks` (None: as many rows as the prompt needs; 1: truncate)."""

    tokenize: Callable[[list[str]], list[list[int]]]
    bos: int
    eos: int
    pad: int
    length: int = CHUNK
    comma: int | None = None
    max_chunks: int | None = None


def chunk_tokens(parsed: list[tuple[str, float]], pieces: list[list[int]], length: int = CHUNK,
                 comma: int | None = None, backtrack: int = COMMA_BACKTRACK) -> list[tuple[list[int], list[float]]]:
    """(ids, weights) of each chunk of at most `length` tokens: `pieces[i]` are the tokens of
    `parsed[i]`; BREAK closes the chunk; a full chunk hands the words after its last comma (at most
    `backtrack` tokens back) to the next one. An empty prompt is one empty chunk."""
    chunks: list[tuple[list[int], list[float]]] = []
    ids: list[int] = []
    weights: list[float] = []
    last_comma = -1
    for (text, weight), tokens in zip(parsed, pieces):
        if (text, weight) == BREAK:
            chunks.append((ids, weights))
            ids, weights, last_comma = [], [], -1
            continue
        for token in tokens:
            if comma is not None and token == comma:
                last_comma = len(ids)
            elif backtrack and len(ids) == length and last_comma != -1 and len(ids) - last_comma <= backtrack:
                cut = last_comma + 1
                chunks.append((ids[:cut], weights[:cut]))
                ids, weights, last_comma = ids[cut:], weights[cut:], -1
            if len(ids) == length:
                chunks.append((ids, weights))
                ids, weights, last_comma = [], [], -1
            ids.append(token)
            weights.append(weight)
    if ids or not chunks:
        chunks.append((ids, weights))
    return chunks


def rows(chunks: list[tuple[list[int], list[float]]], tok: Tokens) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Chunks as encoder rows: ids [k, length + 2] = [BOS] ids [EOS] [PAD]..., their weights (1 on the
    special tokens) and the mask of the real tokens (BOS to EOS)."""
    width = tok.length + 2
    ids = torch.full((len(chunks), width), tok.pad, dtype=torch.long)
    weights = torch.ones(len(chunks), width)
    mask = torch.zeros(len(chunks), width, dtype=torch.bool)
    for k, (body, w) in enumerate(chunks):
        row = [tok.bos] + body + [tok.eos]
        ids[k, : len(row)] = torch.tensor(row)
        weights[k, 1: len(body) + 1] = torch.tensor(w, dtype=torch.float32)
        mask[k, : len(row)] = True
    return ids, weights, mask


def emphasize(z: torch.Tensor, weights: torch.Tensor) -> torch.Tensor:
    """Hidden states [k, L, D] of k chunks times their token weights [k, L], each chunk rescaled to
    its former mean (A1111's "Original" emphasis), in float32; all-1 weights return `z` itself."""
    if bool((weights == 1).all()):
        return z
    zf = z.float()
    before = zf.mean(dim=(1, 2), keepdim=True)
    zf = zf * weights.to(zf.device)[..., None]
    zf = zf * (before / zf.mean(dim=(1, 2), keepdim=True))
    return zf.to(z.dtype)


def hf_tokens(tokenizer, prepare: Callable[[list[str]], list[str]], max_length: int, chunked: bool) -> Tokens:
    """A transformers tokenizer as `encode_weighted` reads it; `prepare` turns each text into what the
    tokenizer sees (normalisation, textual-inversion expansion)."""
    t = tokenizer
    bos = t.bos_token_id if t.bos_token_id is not None else t.cls_token_id
    eos = t.eos_token_id if t.eos_token_id is not None else t.sep_token_id
    pad = t.pad_token_id if t.pad_token_id is not None else eos
    comma = t.get_vocab().get(",</w>") if chunked else None  # CLIP's BPE comma
    return Tokens(lambda texts: t(prepare(texts), add_special_tokens=False)["input_ids"], bos, eos, pad,
                  max_length - 2, comma, None if chunked else 1)


def encode_weighted(prompt: str, tok: Tokens, forward: Callable[[torch.Tensor, torch.Tensor], Conditioning],
                    max_length: int | None = None) -> Conditioning:
    """One prompt with the syntax applied: chunks (or one row when `tok.max_chunks` is 1: a longer
    prompt is cut with a warning naming `max_length`), run through `forward(ids, mask) ->
    Conditioning` as one batch, weighted and joined along the token axis. The pooled vector is the
    first chunk's (A1111)."""
    parsed = parse_prompt_attention(prompt)
    texts = [t for t, w in parsed]
    pieces = [[] if (t, w) == BREAK else p for (t, w), p in zip(parsed, tok.tokenize(texts))]
    if tok.max_chunks == 1:  # word-level encoders: BREAK is a word boundary, long prompts are cut
        flat = [(i, w) for (t, w), p in zip(parsed, pieces) if (t, w) != BREAK for i in p]
        if len(flat) > tok.length:
            warn_truncated([prompt], [len(flat) + 2], max_length or tok.length + 2)
        flat = flat[: tok.length]
        chunks = [([i for i, _ in flat], [w for _, w in flat])]
    else:
        chunks = chunk_tokens(parsed, pieces, tok.length, tok.comma)
        if tok.max_chunks is not None:
            chunks = chunks[: tok.max_chunks]
    ids, weights, mask = rows(chunks, tok)
    out = forward(ids, mask)
    z = emphasize(out.context, weights)
    k, length, dim = z.shape
    return Conditioning(context=z.reshape(1, k * length, dim),
                        pooled=None if out.pooled is None else out.pooled[:1],
                        mask=None if out.mask is None else out.mask.reshape(1, k * length))


# ------------------------------------------------------------------------------------------------ batches
def stack_rows(rows_: list[Conditioning]) -> Conditioning:
    """Rows of one prompt each ([1, L_i, D]) as a batch; shorter contexts are padded with zeros that
    a mask hides from cross-attention (so a prompt's image does not depend on its batch)."""
    if all(r.context.shape[1] == rows_[0].context.shape[1] for r in rows_):
        cat = [r if r.mask is not None or all(q.mask is None for q in rows_) else
               r.replace(mask=torch.ones(r.context.shape[:2], dtype=torch.bool, device=r.context.device))
               for r in rows_]
        return Conditioning.cat(cat)
    length = max(r.context.shape[1] for r in rows_)
    return Conditioning.cat([_pad(r, length) for r in rows_])


def _pad(c: Conditioning, length: int) -> Conditioning:
    b, n, d = c.context.shape
    mask = c.mask if c.mask is not None else torch.ones(b, n, dtype=torch.bool, device=c.context.device)
    if n == length:
        return c.replace(mask=mask)
    extra = length - n
    return c.replace(context=torch.cat([c.context, c.context.new_zeros(b, extra, d)], dim=1),
                     mask=torch.cat([mask.to(torch.bool), mask.new_zeros(b, extra, dtype=torch.bool)], dim=1))


def same_length(cond: Conditioning | None, uncond: Conditioning | None) -> tuple:
    """A prompt and a negative prompt of different lengths (chunks), padded to one length under a
    mask so that CFG batches them; as A1111 running them apart, the padding changes nothing."""
    if cond is None or uncond is None or cond.context is None or uncond.context is None:
        return cond, uncond
    n, m = cond.context.shape[1], uncond.context.shape[1]
    if n == m and (cond.mask is None) == (uncond.mask is None):
        return cond, uncond
    length = max(n, m)
    return _pad(cond, length), _pad(uncond, length)


def encode_prompts(conditioner, prompts: list[str]) -> Conditioning:
    """`conditioner.encode` with the prompt syntax, where the conditioner reads it (its class sets
    `prompt_syntax = True` and its encode takes `syntax=`); others get the prompts as they are."""
    if getattr(conditioner, "prompt_syntax", False):
        return conditioner.encode(prompts, syntax=True)
    return conditioner.encode(prompts)
