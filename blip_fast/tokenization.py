"""BLIP's text tokenizer: BERT uncased WordPiece plus ``[DEC]`` (bos, id 30522) and ``[ENC]``
(id 30523), 30524 ids in all; ``[CLS]`` 101, ``[SEP]`` 102 (also eos), ``[PAD]`` 0.

Built directly with the ``tokenizers`` library (imports in ~15 ms, no ``transformers``) and
id-for-id equal to ``BertTokenizerFast`` + ``add_special_tokens({'bos_token': '[DEC]'})`` +
``add_special_tokens({'additional_special_tokens': ['[ENC]']})``, the official setup.

The vocab, first hit wins: the ``vocab`` argument (a ``vocab.txt`` or a directory holding
one), then ``BLIP_FAST_VOCAB`` (see :mod:`blip_fast.envs`), then the bert-base-uncased vocab
shipped in the package (``blip_fast/vocab/``; its NOTICE gives source, licence and checksum).
A path given by the argument or the variable must exist: a typo should not silently pick
another vocab.
"""

from __future__ import annotations

import json
import os
from collections.abc import Iterable, Sequence
from importlib import resources
from pathlib import Path
from typing import Literal

import torch
from tokenizers import (
    AddedToken,
    Tokenizer,
    decoders,
    models,
    normalizers,
    pre_tokenizers,
    processors,
)

from blip_fast import envs

__all__ = ["BlipTokenizer", "Encoding", "find_vocab", "packaged_vocab", "tokenizer"]

_BERT_SPECIALS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]")
BOS_TOKEN, ENC_TOKEN = "[DEC]", "[ENC]"


def packaged_vocab() -> Path:
    """The bert-base-uncased ``vocab.txt`` shipped as package data. blip_fast installs as
    files (it carries a compiled extension), so the resource is a real path."""
    path = Path(str(resources.files("blip_fast") / "vocab" / "bert-base-uncased-vocab.txt"))
    if not path.is_file():
        raise FileNotFoundError(
            f"BERT vocab not found: the packaged {path} is missing (an install without package "
            f"data?); pass vocab= or set BLIP_FAST_VOCAB to a bert-base-uncased vocab.txt"
        )
    return path


def find_vocab(vocab: str | os.PathLike | None = None) -> Path:
    """Path of the BERT uncased ``vocab.txt`` to use (lookup order in the module docstring)."""
    for given, source in ((vocab, "vocab argument"), (envs.vocab_file(), "BLIP_FAST_VOCAB")):
        if given is not None:
            path = Path(given)
            path = path / "vocab.txt" if path.is_dir() else path
            if not path.is_file():
                raise FileNotFoundError(f"BERT vocab not found: {source} points to {path}")
            return path
    return packaged_vocab()


class Encoding(dict):
    """``input_ids`` and ``attention_mask``; attribute access and ``.to()`` like HF's
    ``BatchEncoding``, so official-style ``text.input_ids`` / ``.to(device)`` code works."""

    def __getattr__(self, name):
        try:
            return self[name]
        except KeyError:
            raise AttributeError(name) from None

    def to(self, device) -> Encoding:
        return Encoding({k: v.to(device) for k, v in self.items()})


def clean_up_tokenization(text: str) -> str:
    """HF's ``clean_up_tokenization``: glue punctuation and English contractions back on."""
    for dirty, clean in (
        (" .", "."),
        (" ?", "?"),
        (" !", "!"),
        (" ,", ","),
        (" ' ", "'"),
        (" n't", "n't"),
        (" 'm", "'m"),
        (" 's", "'s"),
        (" 've", "'ve"),
        (" 're", "'re"),
    ):
        text = text.replace(dirty, clean)
    return text


class BlipTokenizer:
    """BERT uncased WordPiece + ``[DEC]`` / ``[ENC]``; build with :func:`tokenizer`."""

    def __init__(self, vocab_file: str | os.PathLike):
        self.vocab_file = Path(vocab_file)
        vocab = models.WordPiece.read_file(str(self.vocab_file))
        missing = [t for t in _BERT_SPECIALS if t not in vocab]
        if missing:
            raise ValueError(f"{self.vocab_file} is not a BERT vocab: no {', '.join(missing)}")
        tok = Tokenizer(models.WordPiece(vocab, unk_token="[UNK]", max_input_chars_per_word=100))
        # strip_accents=None follows lowercase, i.e. accents are stripped (bert-base-uncased)
        tok.normalizer = normalizers.BertNormalizer(
            clean_text=True, handle_chinese_chars=True, strip_accents=None, lowercase=True
        )
        tok.pre_tokenizer = pre_tokenizers.BertPreTokenizer()
        tok.post_processor = processors.TemplateProcessing(
            single="[CLS] $A [SEP]",
            pair="[CLS] $A [SEP] $B:1 [SEP]:1",
            special_tokens=[("[CLS]", vocab["[CLS]"]), ("[SEP]", vocab["[SEP]"])],
        )
        tok.decoder = decoders.WordPiece(prefix="##", cleanup=True)
        # normalized=False as HF registers special tokens: "[CLS]" in a text is the special token
        # but "[cls]" is not. [DEC] then [ENC] get the ids len(vocab), len(vocab) + 1.
        tok.add_special_tokens(
            [
                AddedToken(t, normalized=False, special=True)
                for t in (*_BERT_SPECIALS, BOS_TOKEN, ENC_TOKEN)
            ]
        )
        self._tok = tok
        self.cls_token_id = vocab["[CLS]"]
        self.sep_token_id = self.eos_token_id = vocab["[SEP]"]
        self.pad_token_id = vocab["[PAD]"]
        self.unk_token_id = vocab["[UNK]"]
        self.mask_token_id = vocab["[MASK]"]
        self.bos_token_id = tok.token_to_id(BOS_TOKEN)
        self.enc_token_id = tok.token_to_id(ENC_TOKEN)
        self.vocab_size = tok.get_vocab_size(with_added_tokens=True)

    def __len__(self) -> int:
        return self.vocab_size

    def __repr__(self) -> str:
        return f"BlipTokenizer(vocab_file={str(self.vocab_file)!r}, vocab_size={self.vocab_size})"

    def __call__(
        self,
        texts: str | Sequence[str],
        padding: Literal["longest", "max_length"] = "longest",
        truncation: bool = True,
        max_length: int = 35,
        return_tensors: Literal["pt"] | None = "pt",
    ) -> Encoding:
        """Tokenise ``[CLS] text [SEP]`` per text.

        Arguments: texts: a string or a list of N strings. Returns ``input_ids`` and
        ``attention_mask``: (N, L) int64 tensors (lists of lists if ``return_tensors=None``),
        right-padded with ``[PAD]``; L is the longest row (``"longest"``) or at least
        ``max_length`` (``"max_length"``). With ``truncation`` a row keeps its first
        ``max_length - 1`` tokens and ends in ``[SEP]``, as HF truncation does.
        """
        if padding not in ("longest", "max_length"):
            raise ValueError(f"padding must be 'longest' or 'max_length', not {padding!r}")
        if return_tensors not in ("pt", None):
            raise ValueError(f"return_tensors must be 'pt' or None, not {return_tensors!r}")
        if isinstance(texts, str):
            texts = [texts]
        # Truncation and padding are done here rather than by enable_truncation/enable_padding,
        # which would mutate the shared Rust tokenizer on every call (racy across threads).
        rows = [enc.ids for enc in self._tok.encode_batch(list(texts))]
        if truncation:
            rows = [
                r if len(r) <= max_length else r[: max_length - 1] + [self.sep_token_id]
                for r in rows
            ]
        width = max(map(len, rows), default=0)
        if padding == "max_length":
            width = max(width, max_length)
        ids = [r + [self.pad_token_id] * (width - len(r)) for r in rows]
        mask = [[1] * len(r) + [0] * (width - len(r)) for r in rows]
        if return_tensors == "pt":
            shape = (len(rows), width)
            return Encoding(
                input_ids=torch.tensor(ids, dtype=torch.long).reshape(shape),
                attention_mask=torch.tensor(mask, dtype=torch.long).reshape(shape),
            )
        return Encoding(input_ids=ids, attention_mask=mask)

    def decode(
        self,
        ids: Iterable[int] | torch.Tensor,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = True,
    ) -> str:
        """Ids (1-D) to text, as HF ``BertTokenizerFast.decode`` with the same arguments.

        ``clean_up_tokenization_spaces=True`` is what official BLIP's captions went through
        (transformers 4.x default): it also turns ``"man ' s"`` into ``"man's"``.
        """
        if isinstance(ids, torch.Tensor):
            ids = ids.reshape(-1).tolist()
        text = self._tok.decode(list(ids), skip_special_tokens=skip_special_tokens)
        return clean_up_tokenization(text) if clean_up_tokenization_spaces else text

    def batch_decode(
        self,
        sequences: Iterable[Iterable[int]] | torch.Tensor,
        skip_special_tokens: bool = True,
        clean_up_tokenization_spaces: bool = True,
    ) -> list[str]:
        """:meth:`decode` per row of ``sequences`` ((N, L) tensor or list of id lists)."""
        if isinstance(sequences, torch.Tensor):
            sequences = sequences.tolist()
        return [
            self.decode(s, skip_special_tokens, clean_up_tokenization_spaces) for s in sequences
        ]

    def save_pretrained(self, directory: str | os.PathLike) -> list[Path]:
        """Write ``vocab.txt``, ``tokenizer.json`` and ``tokenizer_config.json`` such that
        ``transformers.BertTokenizerFast.from_pretrained(directory)`` (and the slow
        ``BertTokenizer``) rebuild this tokenizer with the same ids. Returns the files."""
        out = Path(directory)
        out.mkdir(parents=True, exist_ok=True)
        vocab = out / "vocab.txt"
        base = self._tok.get_vocab(with_added_tokens=False)
        vocab.write_text(
            "".join(t + "\n" for t in sorted(base, key=base.__getitem__)), encoding="utf-8"
        )
        tok_json = out / "tokenizer.json"
        self._tok.save(str(tok_json))
        added = {
            str(i): {
                "content": t.content,
                "lstrip": False,
                "normalized": False,
                "rstrip": False,
                "single_word": False,
                "special": True,
            }
            for i, t in sorted(self._tok.get_added_tokens_decoder().items())
        }
        config = {
            "tokenizer_class": "BertTokenizer",
            "do_lower_case": True,
            "do_basic_tokenize": True,
            "tokenize_chinese_chars": True,
            "strip_accents": None,
            "model_max_length": 512,
            "clean_up_tokenization_spaces": True,
            "unk_token": "[UNK]",
            "sep_token": "[SEP]",
            "pad_token": "[PAD]",
            "cls_token": "[CLS]",
            "mask_token": "[MASK]",
            "bos_token": BOS_TOKEN,
            # transformers >= 5 reads extra_special_tokens, 4.x additional_special_tokens
            "extra_special_tokens": [ENC_TOKEN],
            "additional_special_tokens": [ENC_TOKEN],
            "added_tokens_decoder": added,
        }
        cfg = out / "tokenizer_config.json"
        cfg.write_text(json.dumps(config, indent=2) + "\n", encoding="utf-8")
        return [vocab, tok_json, cfg]


def tokenizer(vocab: str | os.PathLike | None = None) -> BlipTokenizer:
    """The BLIP tokenizer over the vocab found by :func:`find_vocab`."""
    return BlipTokenizer(find_vocab(vocab))
