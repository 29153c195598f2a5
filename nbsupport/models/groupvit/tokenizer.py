"""CLIP's byte-pair-encoding tokenizer with the vocabulary shipped in ``assets/`` (no network needed)."""

from __future__ import annotations

import gzip
import html
import math
import re as _re
from functools import lru_cache
from pathlib import Path

import torch


# ============================================================================================== tokenizer
def _bytes_to_unicode() -> dict[int, str]:
    """CLIP's reversible byte -> printable character table: printable Latin-1 bytes map to themselves (listed
    first: the vocabulary's order depends on it), the other bytes to ``chr(256 + n)``."""
    keep = (
        list(range(ord("!"), ord("~") + 1)) + list(range(ord("¡"), ord("¬") + 1)) + list(range(ord("®"), ord("ÿ") + 1))
    )
    table = {b: chr(b) for b in keep}
    for n, b in enumerate(b for b in range(256) if b not in table):
        table[b] = chr(256 + n)
    return table


class Tokenizer:
    """CLIP byte-pair-encoding tokenizer from the packaged vocabulary (no network): lower-cased text ->
    ``[<|startoftext|>, ..., <|endoftext|>]`` ids padded with 0 to ``context_length`` (77).

    Uses ``regex`` for the Unicode letter/number classes when installed, else the stdlib ``re`` with
    ``[^\\W\\d_]`` / ``\\d`` (identical on ASCII text; may differ on rare scripts). ``ftfy`` (mojibake repair)
    is applied when installed; without it only HTML unescaping and whitespace cleaning are done."""

    SOT, EOT = "<|startoftext|>", "<|endoftext|>"

    def __init__(self, bpe_path: str | Path | None = None, context_length: int = 77):
        bpe_path = Path(bpe_path) if bpe_path else Path(__file__).parent / "assets" / "bpe_simple_vocab_16e6.txt.gz"
        lines = gzip.open(bpe_path, "rt", encoding="utf-8").read().split("\n")
        merges = [tuple(l.split()) for l in lines[1 : 49152 - 256 - 2 + 1]]
        self.byte_encoder = _bytes_to_unicode()
        self.byte_decoder = {v: k for k, v in self.byte_encoder.items()}
        base = list(self.byte_encoder.values())
        vocab = base + [c + "</w>" for c in base] + ["".join(m) for m in merges] + [self.SOT, self.EOT]
        self.encoder = {t: i for i, t in enumerate(vocab)}
        self.decoder = {i: t for t, i in self.encoder.items()}
        self.ranks = {m: i for i, m in enumerate(merges)}
        self.context_length = context_length
        self.sot, self.eot = self.encoder[self.SOT], self.encoder[self.EOT]
        try:
            import regex

            self._pat = regex.compile(
                r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[\p{L}]+|[\p{N}]|"
                r"[^\s\p{L}\p{N}]+",
                regex.IGNORECASE,
            )
        except ImportError:
            self._pat = _re.compile(
                r"<\|startoftext\|>|<\|endoftext\|>|'s|'t|'re|'ve|'m|'ll|'d|[^\W\d_]+|\d|"
                r"[^\s\w]+|_+",
                _re.IGNORECASE,
            )
        self._cache: dict[str, list[str]] = {}

    @property
    def vocab_size(self) -> int:
        return len(self.encoder)

    def _bpe(self, token: str) -> list[str]:
        if token in self._cache:
            return self._cache[token]
        word = list(token[:-1]) + [token[-1] + "</w>"]
        while len(word) > 1:
            pairs = {(word[i], word[i + 1]) for i in range(len(word) - 1)}
            best = min(pairs, key=lambda p: self.ranks.get(p, math.inf))
            if best not in self.ranks:
                break
            merged, i = [], 0
            while i < len(word):
                if i < len(word) - 1 and (word[i], word[i + 1]) == best:
                    merged.append(word[i] + word[i + 1])
                    i += 2
                else:
                    merged.append(word[i])
                    i += 1
            word = merged
        self._cache[token] = word
        return word

    @staticmethod
    def clean(text: str) -> str:
        try:
            import ftfy

            text = ftfy.fix_text(text)
        except ImportError:
            pass
        text = html.unescape(html.unescape(text)).strip()
        return _re.sub(r"\s+", " ", text).strip().lower()

    def encode(self, text: str) -> list[int]:
        """BPE ids of ``text`` without start/end tokens."""
        ids = []
        for tok in self._pat.findall(self.clean(text)):
            tok = "".join(self.byte_encoder[b] for b in tok.encode("utf-8"))
            ids.extend(self.encoder[t] for t in self._bpe(tok))
        return ids

    def decode(self, ids) -> str:
        text = "".join(self.decoder[int(i)] for i in ids if int(i) not in (self.sot, self.eot, 0))
        return (
            bytearray(self.byte_decoder[c] for c in text).decode("utf-8", errors="replace").replace("</w>", " ").strip()
        )

    def __call__(self, texts, context_length: int | None = None, truncate: bool = True) -> torch.Tensor:
        """``[K, context_length]`` int64 ids for a string or list of strings."""
        texts = [texts] if isinstance(texts, str) else list(texts)
        L = context_length or self.context_length
        out = torch.zeros(len(texts), L, dtype=torch.long)
        for i, t in enumerate(texts):
            ids = [self.sot] + self.encode(t) + [self.eot]
            if len(ids) > L:
                if not truncate:
                    raise ValueError(f"text {t!r} has {len(ids)} tokens > context length {L}")
                ids = ids[: L - 1] + [self.eot]
            out[i, : len(ids)] = torch.tensor(ids)
        return out


@lru_cache(maxsize=1)
def tokenizer() -> Tokenizer:
    """The shared :class:`Tokenizer` (the vocabulary is read once)."""
    return Tokenizer()
