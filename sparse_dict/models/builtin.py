"""The built-in 1-layer transformer language model and its BPE tokenizer.

The model has the shape of the reference set-up for sparse dictionary
learning on a language model: one pre-LayerNorm residual block with
``d_model = 128`` and a 512-neuron ReLU MLP. The MLP post-activation, the
output of ``model.blocks[layer].mlp.act``, is where activations are read.

The shipped weights live in ``sparse_dict/models/builtin/`` and are produced
by ``python -m sparse_dict.models.train_builtin``.
"""

from __future__ import annotations

import heapq
import json
import math
import re
from collections import Counter, defaultdict
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from sparse_dict import _persist

__all__ = [
    "BuiltinTokenizer",
    "TinyTransformer",
    "TinyTransformerConfig",
    "load_builtin_model",
    "save_builtin_model",
    "BUILTIN_DIR",
]

BUILTIN_DIR = Path(__file__).resolve().parent / "builtin"
_WEIGHTS_FILE = "model.safetensors"
_CONFIG_FILE = "config.json"
_TOKENIZER_FILE = "tokenizer.json"

# Words keep their leading space, so that " king" and "king" are different
# tokens and decoding is plain concatenation. Runs of newlines are their own
# words so that a blank line can become one token. The alternatives together
# match every character, which is what makes encode/decode an exact round trip.
_PRETOKENIZE_PATTERN = (
    r"'(?:s|t|d|ll|re|ve|m)\b"
    r"| ?[^\W\d_]+"
    r"| ?\d+"
    r"| ?(?:[^\s\w]|_)+"
    r"|\n+"
    r"|[^\S\n]+(?!\S)"
    r"|[^\S\n]+"
)

PAD_TOKEN = "<pad>"
EOT_TOKEN = "<|endoftext|>"

# A word of more characters than this is encoded in pieces of this many,
# merges not crossing them: a text cut to max_length is then encoded only as
# far as it is kept, however long its words (an unbroken run of 100,000
# letters was encoded whole, in 10 s, for its first 128 tokens). No word of
# ordinary text is that long (the training corpus's longest has 63
# characters, the longest token 24 bytes), so its tokens are those of the
# word whole.
_PIECE_CHARS = 1000
# Only words this short are cached: the common words recur, and an
# over-long one (a blob, a separator line) would fill the cache with
# strings met once.
_CACHED_WORD_CHARS = 64


# --------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------


def _merge_word(symbols, pair, new_id):
    """Replace every non-overlapping occurrence of ``pair`` in ``symbols``."""
    out = []
    i = 0
    n = len(symbols)
    while i < n:
        if i < n - 1 and symbols[i] == pair[0] and symbols[i + 1] == pair[1]:
            out.append(new_id)
            i += 2
        else:
            out.append(symbols[i])
            i += 1
    return out


def _bpe(symbols, ranks):
    """The tokens of one word's bytes: its adjacent pair of lowest rank merged until none is left.

    The same tokens as merging every occurrence of that pair, left to right,
    and looking again (:func:`_merge_word`, as training does), in
    O(n log n) rather than O(n²) for n bytes: the pairs wait in a heap
    ordered by rank, then position. A merge's token only makes pairs of
    later merges, so all occurrences of a pair are in the heap before the
    first of them is merged, and are merged left to right as
    :func:`_merge_word` does; an entry whose pair has changed since it was
    pushed is skipped.

    Parameters
    ----------
    symbols : list of int
        The word's bytes.
    ranks : dict
        Pair of token ids -> the id of the token merging them (its rank).

    Returns
    -------
    list of int
    """
    n = len(symbols)
    if n < 2:
        return list(symbols)
    tokens = list(symbols)  # None where a token has merged into its left neighbour
    following = list(range(1, n + 1))
    following[-1] = -1
    preceding = list(range(-1, n - 1))
    rank_of = ranks.get
    heap = [(rank, i) for i, pair in enumerate(zip(tokens, tokens[1:]))
            if (rank := rank_of(pair)) is not None]
    heapq.heapify(heap)
    while heap:
        rank, i = heapq.heappop(heap)
        j = following[i]
        if j < 0 or tokens[i] is None or rank_of((tokens[i], tokens[j])) != rank:
            continue
        tokens[i], tokens[j] = rank, None
        k = following[j]
        following[i] = k
        if k >= 0:
            preceding[k] = i
            if (right := rank_of((rank, tokens[k]))) is not None:
                heapq.heappush(heap, (right, i))
        h = preceding[i]
        if h >= 0 and (left := rank_of((tokens[h], rank))) is not None:
            heapq.heappush(heap, (left, h))
    return [t for t in tokens if t is not None]


def _is_tokenizer(data):
    return (isinstance(data, dict) and data.get("type") == "byte-level-bpe"
            and isinstance(data.get("merges"), list))


# What BuiltinTokenizer.save writes, and so may replace with overwrite.
TOKENIZER_KIND = _persist.json_kind("built-in tokenizer", _is_tokenizer)


class BuiltinTokenizer:
    """Byte-level BPE tokenizer with readable, whole-word tokens.

    Text is first split into words (a word keeps its leading space), each
    word into its UTF-8 bytes, then learned merges join frequent byte pairs
    into longer tokens. Any text round-trips exactly, and common words are a
    single token such as ``' king'``.

    Ids ``0..255`` are single bytes, the merged tokens follow, and two special
    tokens end the vocabulary: ``<|endoftext|>`` (separates documents during
    training) and ``<pad>``.

    Parameters
    ----------
    merges : list of tuple of int
        The learned merges in order; merge ``k`` creates token ``256 + k``.
    pattern : str, optional
        Regular expression of the pre-tokenisation into words.

    Attributes
    ----------
    vocab_size : int
        Number of token ids, special tokens included.
    pad_token_id : int
        Id used to pad batches on the right.
    eot_token_id : int
        Id of the end-of-text token.

    See Also
    --------
    load_builtin_model : Loads the shipped model and its tokenizer.

    Examples
    --------
    >>> from sparse_dict.models.builtin import BuiltinTokenizer
    >>> tok = BuiltinTokenizer.train(["to be or not to be, that is the question"] * 3,
    ...                              vocab_size=270)
    >>> ids = tok.encode("to be, or not")
    >>> tok.decode(ids)
    'to be, or not'
    >>> tok.convert_ids_to_tokens(tok.encode(" to be"))
    [' to', ' be']
    >>> batch = tok([" to be", " be"], padding=True)
    >>> batch["input_ids"].shape, batch["attention_mask"].tolist()
    (torch.Size([2, 2]), [[1, 1], [1, 0]])
    """

    def __init__(self, merges, pattern=_PRETOKENIZE_PATTERN):
        self.merges = [tuple(int(t) for t in m) for m in merges]
        self.pattern = pattern
        self._regex = re.compile(pattern)
        self._ranks = {pair: 256 + k for k, pair in enumerate(self.merges)}
        self._token_bytes = [bytes([b]) for b in range(256)]
        for a, b in self.merges:
            self._token_bytes.append(self._token_bytes[a] + self._token_bytes[b])
        self.eot_token_id = len(self._token_bytes)
        self.pad_token_id = self.eot_token_id + 1
        self.vocab_size = self.pad_token_id + 1
        self._specials = {self.eot_token_id: EOT_TOKEN, self.pad_token_id: PAD_TOKEN}
        self._cache = {}

    # ---- training ---------------------------------------------------------

    @classmethod
    def train(cls, texts, vocab_size=2048, pattern=_PRETOKENIZE_PATTERN, verbose=False):
        """Learn BPE merges from word frequencies in ``texts``.

        Parameters
        ----------
        texts : iterable of str
            Training texts.
        vocab_size : int, default=2048
            Largest vocabulary size, the 256 bytes and 2 special tokens
            included. Training stops earlier when no pair occurs twice.
        pattern : str, optional
            Pre-tokenisation regular expression.
        verbose : bool, default=False
            Print progress every few hundred merges.

        Returns
        -------
        tokenizer : BuiltinTokenizer

        Examples
        --------
        >>> tok = BuiltinTokenizer.train(["one two one"], vocab_size=262)
        >>> tok.convert_ids_to_tokens(tok.encode("one two"))
        ['one', ' ', 't', 'w', 'o']
        """
        n_merges = vocab_size - 256 - 2
        if n_merges < 0:
            raise ValueError(f"vocab_size must be at least 258, got {vocab_size}.")
        regex = re.compile(pattern)
        word_counts = Counter()
        for text in texts:
            word_counts.update(regex.findall(text))
        words = [list(w.encode("utf-8")) for w in word_counts]
        freqs = list(word_counts.values())

        # Pair counts are updated incrementally from the words a merge touches,
        # which keeps training to seconds instead of recounting every merge.
        pair_counts = defaultdict(int)
        pair_words = defaultdict(set)
        for wi, (symbols, f) in enumerate(zip(words, freqs)):
            for pair in zip(symbols, symbols[1:]):
                pair_counts[pair] += f
                pair_words[pair].add(wi)

        merges = []
        for k in range(n_merges):
            if not pair_counts:
                break
            # Ties broken by the pair itself, so training is deterministic.
            best = max(pair_counts.items(), key=lambda item: (item[1], item[0]))[0]
            if pair_counts[best] < 2:
                break
            new_id = 256 + k
            merges.append(best)
            for wi in list(pair_words[best]):
                old = words[wi]
                f = freqs[wi]
                for pair in zip(old, old[1:]):
                    pair_counts[pair] -= f
                    if pair_counts[pair] <= 0:
                        del pair_counts[pair]
                    pair_words[pair].discard(wi)
                new = _merge_word(old, best, new_id)
                words[wi] = new
                for pair in zip(new, new[1:]):
                    pair_counts[pair] += f
                    pair_words[pair].add(wi)
            pair_words.pop(best, None)
            pair_counts.pop(best, None)
            if verbose and (k + 1) % 500 == 0:
                print(f"  {k + 1} merges")
        return cls(merges, pattern=pattern)

    # ---- encoding ---------------------------------------------------------

    def _encode_word(self, word):
        ids = self._cache.get(word)
        if ids is not None:
            return ids
        ids = _bpe(list(word.encode("utf-8")), self._ranks)
        if len(word) <= _CACHED_WORD_CHARS and len(self._cache) < 200_000:
            self._cache[word] = ids
        return ids

    def _encode(self, text, max_tokens=None):
        """Token ids of ``text``; with ``max_tokens``, at least that many of its first.

        Encoding stops at the word (or piece of an over-long word) that
        reaches ``max_tokens``: the caller cuts the rest.
        """
        ids = []
        for match in self._regex.finditer(text):
            word = match.group()
            for start in range(0, len(word), _PIECE_CHARS):
                ids.extend(self._encode_word(word[start:start + _PIECE_CHARS]))
                if max_tokens is not None and len(ids) >= max_tokens:
                    return ids
        return ids

    def encode(self, text):
        """Token ids of ``text`` (no special tokens added).

        A word of more than 1,000 characters (a run of letters, of
        punctuation or of spaces), which no ordinary text holds, is encoded
        in pieces of 1,000 characters, merges not crossing them, so that
        encoding takes time in proportion to the text's length.

        Parameters
        ----------
        text : str

        Returns
        -------
        ids : list of int

        Examples
        --------
        >>> tok = BuiltinTokenizer([])
        >>> tok.encode("hi")
        [104, 105]
        """
        if not isinstance(text, str):
            raise TypeError(f"text must be a str, got {type(text).__name__}.")
        return self._encode(text)

    def decode(self, ids, skip_special_tokens=True):
        """Text of a sequence of token ids.

        Parameters
        ----------
        ids : sequence of int or torch.Tensor
        skip_special_tokens : bool, default=True
            Drop padding and end-of-text tokens instead of writing their
            names.

        Returns
        -------
        text : str

        Examples
        --------
        >>> tok = BuiltinTokenizer([])
        >>> tok.decode([104, 105, tok.pad_token_id])
        'hi'
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        chunks = []
        for i in ids:
            i = int(i)
            if i in self._specials:
                if not skip_special_tokens:
                    chunks.append(self._specials[i].encode("utf-8"))
            else:
                chunks.append(self._token_bytes[i])
        return b"".join(chunks).decode("utf-8", errors="replace")

    def convert_ids_to_tokens(self, ids):
        """Readable strings of single tokens, for showing features.

        A token that is only part of a multi-byte character is written with
        backslash escapes (for example ``'\\\\xe2'``).

        Parameters
        ----------
        ids : sequence of int or torch.Tensor

        Returns
        -------
        tokens : list of str

        Examples
        --------
        >>> tok = BuiltinTokenizer([])
        >>> tok.convert_ids_to_tokens([104, tok.pad_token_id])
        ['h', '<pad>']
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.tolist()
        out = []
        for i in ids:
            i = int(i)
            if i in self._specials:
                out.append(self._specials[i])
            else:
                out.append(self._token_bytes[i].decode("utf-8", errors="backslashreplace"))
        return out

    def __call__(self, texts, max_length=None, padding=True, truncation=True):
        """Tokenize a batch of texts into right-padded tensors.

        Parameters
        ----------
        texts : str or list of str
        max_length : int or None, default=None
            Keep at most the first ``max_length`` tokens of each text; the
            rest of a text is not encoded.
        padding : bool, default=True
            Pad to the longest text on the right with ``pad_token_id``. With
            ``False`` all texts must have the same length.
        truncation : bool, default=True
            Accepted for compatibility with Hugging Face tokenizers;
            truncation happens whenever ``max_length`` is given.

        Returns
        -------
        batch : dict
            ``input_ids`` and ``attention_mask``, both LongTensor of shape
            (n_texts, n_tokens); the mask is 1 on real tokens.

        Examples
        --------
        >>> tok = BuiltinTokenizer([])
        >>> tok(["abc", "d"], max_length=2)["input_ids"].tolist()
        [[97, 98], [100, 257]]
        """
        if isinstance(texts, str):
            texts = [texts]
        for t in texts:
            if not isinstance(t, str):
                raise TypeError(f"text must be a str, got {type(t).__name__}.")
        seqs = [self._encode(t, max_length) for t in texts]
        if max_length is not None:
            seqs = [s[:max_length] for s in seqs]
        width = max((len(s) for s in seqs), default=0)
        if not padding and any(len(s) != width for s in seqs):
            raise ValueError(
                "Texts have different numbers of tokens; use padding=True."
            )
        input_ids = torch.full((len(seqs), width), self.pad_token_id, dtype=torch.long)
        attention_mask = torch.zeros((len(seqs), width), dtype=torch.long)
        for row, s in enumerate(seqs):
            input_ids[row, : len(s)] = torch.tensor(s, dtype=torch.long)
            attention_mask[row, : len(s)] = 1
        return {"input_ids": input_ids, "attention_mask": attention_mask}

    # ---- persistence ------------------------------------------------------

    def to_dict(self):
        """JSON-serialisable description of the tokenizer."""
        return {
            "type": "byte-level-bpe",
            "pattern": self.pattern,
            "merges": [list(m) for m in self.merges],
            "special_tokens": {EOT_TOKEN: self.eot_token_id, PAD_TOKEN: self.pad_token_id},
            # Not read back; there so that a person can look at the vocabulary.
            "tokens": self.convert_ids_to_tokens(range(self.vocab_size)),
        }

    def save(self, path, *, overwrite=False):
        """Write the tokenizer as JSON to ``path``.

        As every output of the package: written aside and moved into place
        whole, and an existing file is replaced only with ``overwrite`` and
        only if it is a tokenizer written so (it wrote over any file, and
        through a symbolic link, before).

        Parameters
        ----------
        path : str or path-like
        overwrite : bool, default=False

        Returns
        -------
        path : pathlib.Path
        """
        path = _persist.user_path(path)
        with _persist.staged(path, TOKENIZER_KIND, overwrite=overwrite) as tmp:
            tmp.write_text(json.dumps(self.to_dict(), ensure_ascii=False), encoding="utf-8")
        return path

    @classmethod
    def load(cls, path):
        """Read a tokenizer written by :meth:`save`.

        Raises
        ------
        ValueError
            Naming the file and the field, for a file that is not such a
            tokenizer (not JSON, no ``merges`` or ``pattern``, a merge of
            tokens that do not exist yet, a pattern that is no regular
            expression).
        """
        file = Path(path)
        data = _persist.read_json_object(file)
        pattern = _persist.config_field(data, "pattern", file, kind=str)
        merges = _persist.config_field(data, "merges", file, kind=list)
        for k, merge in enumerate(merges):
            # Each merge joins two tokens that exist before it: the 256 bytes
            # and the merges before it.
            if not (isinstance(merge, list) and len(merge) == 2 and all(
                    isinstance(t, int) and not isinstance(t, bool) and 0 <= t < 256 + k
                    for t in merge)):
                raise ValueError(f"{file}: field 'merges[{k}]' must be two token ids below "
                                 f"{256 + k} (bytes and earlier merges), got {merge!r}")
        try:
            re.compile(pattern)
        except re.error as exc:
            raise ValueError(f"{file}: field 'pattern' is not a regular expression "
                             f"({exc})") from None
        return cls(merges, pattern=pattern)

    def __len__(self):
        return self.vocab_size

    def __repr__(self):
        return f"BuiltinTokenizer(vocab_size={self.vocab_size})"


# --------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------


@dataclass
class TinyTransformerConfig:
    """Shape of a :class:`TinyTransformer`.

    Examples
    --------
    >>> TinyTransformerConfig(vocab_size=300).d_head
    32
    """

    vocab_size: int
    d_model: int = 128
    n_heads: int = 4
    d_mlp: int = 512
    n_layers: int = 1
    max_len: int = 128
    tie_embeddings: bool = False
    layer_norm_eps: float = 1e-5

    @property
    def d_head(self):
        return self.d_model // self.n_heads

    def to_dict(self):
        return asdict(self)

    @classmethod
    def from_dict(cls, data, file="config"):
        """The configuration in ``data``, every field checked (ValueError naming it).

        Examples
        --------
        >>> TinyTransformerConfig.from_dict({"vocab_size": 300, "n_heads": 3})
        Traceback (most recent call last):
        ...
        ValueError: config: field 'd_model' (128) must be a multiple of 'n_heads' (3)
        """
        if not isinstance(data, dict):
            raise ValueError(f"{file}: expected a JSON object")
        known = {f.name for f in fields(cls)}
        for key in data:
            if key not in known:
                raise ValueError(f"{file}: unexpected field {key!r}; a built-in model's "
                                 f"configuration has {sorted(known)}")
        checked = {}
        for key, value in data.items():
            if key == "tie_embeddings":
                checked[key] = _persist.config_field(data, key, file, kind=bool)
            elif key == "layer_norm_eps":
                checked[key] = _persist.Real(0.0, inclusive=False).check(value, file, key)
            else:
                checked[key] = _persist.Integer(1).check(value, file, key)
        if "vocab_size" not in checked:
            raise ValueError(f"{file}: field 'vocab_size' is missing")
        config = cls(**checked)
        if config.d_model % config.n_heads:
            raise ValueError(f"{file}: field 'd_model' ({config.d_model}) must be a multiple "
                             f"of 'n_heads' ({config.n_heads})")
        return config


class Attention(nn.Module):
    """Multi-head causal self-attention."""

    def __init__(self, config):
        super().__init__()
        if config.d_model % config.n_heads:
            raise ValueError("d_model must be a multiple of n_heads.")
        self.n_heads = config.n_heads
        self.qkv = nn.Linear(config.d_model, 3 * config.d_model)
        self.out = nn.Linear(config.d_model, config.d_model)

    def forward(self, x, attn_mask=None):
        B, T, D = x.shape
        q, k, v = self.qkv(x).view(B, T, 3, self.n_heads, D // self.n_heads).unbind(2)
        q, k, v = (t.transpose(1, 2) for t in (q, k, v))
        if attn_mask is None:
            y = F.scaled_dot_product_attention(q, k, v, is_causal=True)
        else:
            y = F.scaled_dot_product_attention(q, k, v, attn_mask=attn_mask)
        return self.out(y.transpose(1, 2).reshape(B, T, D))


class MLP(nn.Module):
    """ReLU MLP; ``act``'s output is the post-activation hook point."""

    def __init__(self, config):
        super().__init__()
        self.fc_in = nn.Linear(config.d_model, config.d_mlp)
        self.act = nn.ReLU()
        self.fc_out = nn.Linear(config.d_mlp, config.d_model)

    def forward(self, x):
        return self.fc_out(self.act(self.fc_in(x)))


class Block(nn.Module):
    """Pre-LayerNorm residual block: attention, then MLP."""

    def __init__(self, config):
        super().__init__()
        self.ln1 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.attn = Attention(config)
        self.ln2 = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.mlp = MLP(config)

    def forward(self, x, attn_mask=None):
        x = x + self.attn(self.ln1(x), attn_mask)
        return x + self.mlp(self.ln2(x))


class TinyTransformer(nn.Module):
    """A small causal transformer language model.

    Token and learned positional embeddings, ``n_layers`` pre-LayerNorm
    residual blocks (attention then ReLU MLP), a final LayerNorm and an
    unembedding to next-token logits.

    Parameters
    ----------
    config : TinyTransformerConfig

    Attributes
    ----------
    config : TinyTransformerConfig
    blocks : torch.nn.ModuleList
        The residual blocks; ``blocks[i].mlp.act`` is an ``nn.ReLU`` whose
        output is the ``d_mlp``-wide MLP post-activation.

    See Also
    --------
    load_builtin_model : The trained model shipped with the package.

    Examples
    --------
    >>> import torch
    >>> from sparse_dict.models.builtin import TinyTransformer, TinyTransformerConfig
    >>> _ = torch.manual_seed(0)
    >>> model = TinyTransformer(TinyTransformerConfig(vocab_size=300, max_len=16))
    >>> model(torch.randint(0, 300, (2, 5))).shape
    torch.Size([2, 5, 300])
    """

    def __init__(self, config):
        super().__init__()
        self.config = config
        self.embed = nn.Embedding(config.vocab_size, config.d_model)
        self.pos_embed = nn.Embedding(config.max_len, config.d_model)
        self.blocks = nn.ModuleList(Block(config) for _ in range(config.n_layers))
        self.ln_final = nn.LayerNorm(config.d_model, eps=config.layer_norm_eps)
        self.unembed = nn.Linear(config.d_model, config.vocab_size, bias=False)
        if config.tie_embeddings:
            self.unembed.weight = self.embed.weight
        self._init_weights()

    def _init_weights(self):
        # GPT-2 style: small normal weights, and residual-writing projections
        # scaled down by depth so the residual stream does not grow with it.
        resid_std = 0.02 / math.sqrt(2 * self.config.n_layers)
        for name, p in self.named_parameters():
            if name.endswith("bias"):
                nn.init.zeros_(p)
            elif p.dim() == 1:
                nn.init.ones_(p)
            elif name.endswith(("attn.out.weight", "mlp.fc_out.weight")):
                nn.init.normal_(p, std=resid_std)
            else:
                nn.init.normal_(p, std=0.02)

    def _check_input(self, input_ids):
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, tokens), got {tuple(input_ids.shape)}."
            )
        if input_ids.shape[1] > self.config.max_len:
            raise ValueError(
                f"Sequences of {input_ids.shape[1]} tokens are longer than the model's "
                f"max_len={self.config.max_len}; truncate them (max_length=...)."
            )

    def embed_tokens(self, input_ids, attention_mask=None):
        """Residual stream before the first block, and the attention mask.

        Parameters
        ----------
        input_ids : LongTensor of shape (batch, tokens)
        attention_mask : LongTensor of shape (batch, tokens) or None

        Returns
        -------
        resid : Tensor of shape (batch, tokens, d_model)
        attn_mask : BoolTensor of shape (batch, 1, tokens, tokens) or None
            Pass it to each block's ``forward``.
        """
        self._check_input(input_ids)
        T = input_ids.shape[1]
        if attention_mask is None:
            positions = torch.arange(T, device=input_ids.device).expand_as(input_ids)
            attn_mask = None
        else:
            mask = attention_mask.to(device=input_ids.device).bool()
            # Positions count real tokens only, so left-padded text gets the
            # same positions as unpadded text; right padding is unaffected.
            positions = (mask.long().cumsum(1) - 1).clamp(min=0)
            causal = torch.ones(T, T, dtype=torch.bool, device=input_ids.device).tril()
            attn_mask = causal & mask[:, None, None, :]
            # Every query may see itself, so rows of padding never hold only
            # -inf (which would give NaN).
            attn_mask = attn_mask | torch.eye(T, dtype=torch.bool, device=input_ids.device)
        return self.embed(input_ids) + self.pos_embed(positions), attn_mask

    def unembed_resid(self, resid):
        """Next-token logits from the final residual stream."""
        return self.unembed(self.ln_final(resid))

    def forward(self, input_ids, attention_mask=None):
        """Next-token logits.

        Parameters
        ----------
        input_ids : LongTensor of shape (batch, tokens)
        attention_mask : LongTensor of shape (batch, tokens) or None
            1 on real tokens, 0 on padding. With right padding the logits of
            the real tokens do not depend on the padding.

        Returns
        -------
        logits : Tensor of shape (batch, tokens, vocab_size)
        """
        x, attn_mask = self.embed_tokens(input_ids, attention_mask)
        for block in self.blocks:
            x = block(x, attn_mask)
        return self.unembed_resid(x)


# --------------------------------------------------------------------------
# Shipped weights
# --------------------------------------------------------------------------


def is_builtin_folder(path):
    """Whether ``path`` is a folder of a model in the built-in format.

    As :func:`save_builtin_model` writes it (``train_builtin --out``): its
    configuration has the built-in model's fields (a Hugging Face
    configuration names a ``model_type`` instead). The configuration alone
    decides, so that a folder lacking its weights or tokenizer is reported
    as such by :func:`load_builtin_model`, not by transformers as a Hugging
    Face folder without a ``model_type``.

    Examples
    --------
    >>> is_builtin_folder(BUILTIN_DIR), is_builtin_folder(BUILTIN_DIR / "config.json")
    (True, False)
    """
    path = Path(path)
    if not (path / _CONFIG_FILE).is_file():
        return False
    try:
        config = json.loads((path / _CONFIG_FILE).read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return False
    return _is_builtin_config(config)


def _is_builtin_config(config):
    return (isinstance(config, dict) and "model_type" not in config
            and {"d_model", "n_heads", "d_mlp", "n_layers", "vocab_size"} <= set(config))


REPORT_FILE = "training_report.json"
# What save_builtin_model writes, and so may replace with overwrite.
BUILTIN_FOLDER = _persist.folder_kind(
    "built-in model's folder",
    {_CONFIG_FILE: _persist.json_kind("built-in model's configuration", _is_builtin_config),
     _WEIGHTS_FILE: None, _TOKENIZER_FILE: None, REPORT_FILE: None},
    required=(_CONFIG_FILE,))


def save_builtin_model(model, tokenizer, path, *, overwrite=False, report=None):
    """Write a model and tokenizer in the layout :func:`load_builtin_model` reads.

    The folder is written aside and moved into place whole, as every output
    of the package: an interrupted write leaves no mix of two models.

    Parameters
    ----------
    model : TinyTransformer
    tokenizer : BuiltinTokenizer
    path : str or Path
        A folder that does not exist yet (its parents are created), or, with
        ``overwrite``, one this function wrote. Any other is refused: its
        files are a user's.
    overwrite : bool, default=False
    report : dict, optional
        Written beside the model as ``training_report.json``.

    Raises
    ------
    FileExistsError
        If ``path`` exists and ``overwrite`` is False.
    ValueError
        If ``path`` holds anything but a built-in model's files.
    """
    from safetensors.torch import save_file

    state = {k: v.detach().to("cpu").contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_embeddings:
        state.pop("unembed.weight", None)
    with _persist.staged(path, BUILTIN_FOLDER, overwrite=overwrite) as tmp:
        save_file(state, str(tmp / _WEIGHTS_FILE))
        (tmp / _CONFIG_FILE).write_text(json.dumps(model.config.to_dict(), indent=2) + "\n",
                                        encoding="utf-8")
        tokenizer.save(tmp / _TOKENIZER_FILE)
        if report is not None:
            (tmp / REPORT_FILE).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return Path(path)


def load_builtin_model(device="cpu", path=None):
    """Load the shipped 1-layer transformer and its tokenizer.

    Parameters
    ----------
    device : str or torch.device, default="cpu"
    path : str or Path or None, default=None
        Directory written by :func:`save_builtin_model`; the weights shipped
        with the package when None.

    Returns
    -------
    model : TinyTransformer
        In eval mode, on ``device``.
    tokenizer : BuiltinTokenizer

    Raises
    ------
    FileNotFoundError
        If the weight, config or tokenizer file is missing.

    Examples
    --------
    >>> from sparse_dict.models.builtin import load_builtin_model
    >>> model, tok = load_builtin_model()
    >>> model.blocks[0].mlp.fc_in.out_features
    512
    """
    shipped = path is None
    path = BUILTIN_DIR if shipped else Path(path)
    missing = [
        name for name in (_WEIGHTS_FILE, _CONFIG_FILE, _TOKENIZER_FILE)
        if not (path / name).is_file()
    ]
    if missing:
        # A folder of the user's was written incompletely or lost files
        # since; reinstalling sparse_dict would not bring them back.
        remedy = ("Reinstall sparse_dict, or retrain them with "
                  "'python -m sparse_dict.models.train_builtin --out <dir>'." if shipped else
                  "Write the folder again whole, with save_builtin_model or "
                  "'python -m sparse_dict.models.train_builtin --out <dir>'.")
        raise FileNotFoundError(
            f"The built-in model files {missing} are missing from {path}. {remedy}"
        )
    config = TinyTransformerConfig.from_dict(_persist.read_json_object(path / _CONFIG_FILE),
                                             path / _CONFIG_FILE)
    tokenizer = BuiltinTokenizer.load(path / _TOKENIZER_FILE)
    if tokenizer.vocab_size != config.vocab_size:
        raise ValueError(
            f"Tokenizer vocabulary ({tokenizer.vocab_size}) does not match the model's "
            f"({config.vocab_size}) in {path}."
        )
    # Every tensor checked (names, shapes from the config, finite values)
    # before the model is built: a configuration of another size, or a huge
    # one, is named, not met as torch's list of mismatched parameters or a
    # failed allocation.
    state = _persist.read_tensors(path / _WEIGHTS_FILE, _weights_schema(config))
    # Its layers draw initial weights, which the saved ones replace: drawn
    # from a generator of their own, torch's global one stays as the caller
    # seeded it.
    with torch.random.fork_rng(devices=[]):
        model = TinyTransformer(config)
    model.load_state_dict({k: torch.from_numpy(v) for k, v in state.items()},
                          strict=not config.tie_embeddings)
    return model.to(device).eval(), tokenizer


def _weights_schema(config):
    """What the weights file of a model of ``config`` holds, for :func:`_persist.read_tensors`."""
    with torch.device("meta"):  # shapes only: nothing allocated, nothing drawn
        shapes = {name: tuple(t.shape) for name, t in TinyTransformer(config).state_dict().items()}
    # A tied model saves its output head as the embedding alone.
    return {name: _persist.TensorSpec(shape, optional=config.tie_embeddings
                                      and name == "unembed.weight")
            for name, shape in shapes.items()}
