"""Tied output heads: an ``lm_head`` that is the input embedding's own tensor.

transformers saves a causal LM whose ``config.json`` ties the word embeddings
(``tie_word_embeddings``, true unless the config says false) without ``lm_head.weight``: the head
*is* the embedding. A base read that way gets ``lm_head.weight`` back as an alias of the embedding
(:class:`TiedHeads`), so that what changes the head — a LoRA on ``lm_head`` (PEFT merges it into
the shared tensor), a ``modules_to_save`` copy, a tuned checkpoint saving the head untied — is
compared with the weights the head started from.

Example:
    >>> tied_head_aliases({"model.embed_tokens.weight": TensorInfo((64, 32), "float32")},
    ...                   {"architectures": ["LlamaForCausalLM"], "tie_word_embeddings": True})
    {'lm_head.weight': 'model.embed_tokens.weight'}
"""

from __future__ import annotations

import dataclasses
import json
import re
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from .base import TensorInfo, TensorSource

if TYPE_CHECKING:
    import numpy as np
    import torch

#: The output head transformers' causal LMs tie to their input embedding.
OUTPUT_HEAD = "lm_head.weight"
#: Input (token) embeddings a causal LM's head may share.
TOKEN_EMBEDDINGS = re.compile(
    r"(^|\.)(embed_tokens|tok_embeddings|word_embeddings|wte|embed_in)\.weight$")
_CAUSAL_LM = re.compile(r"(ForCausalLM|LMHeadModel)$")


def tied_head_aliases(infos: dict[str, TensorInfo], config: dict | None) -> dict[str, str]:
    """``{"lm_head.weight": <embedding>}`` for a causal LM whose config ties its embeddings and
    whose weights omit the head; else empty (untied, not a causal LM, no single embedding)."""
    if not isinstance(config, dict) or config.get("tie_word_embeddings", True) is not True:
        return {}
    architectures = config.get("architectures")
    if not isinstance(architectures, list) or not any(
            isinstance(a, str) and _CAUSAL_LM.search(a) for a in architectures):
        return {}
    if any(n == OUTPUT_HEAD or n.endswith("." + OUTPUT_HEAD) for n in infos):
        return {}
    embeddings = [n for n, i in infos.items() if TOKEN_EMBEDDINGS.search(n) and len(i.shape) == 2]
    return {OUTPUT_HEAD: embeddings[0]} if len(embeddings) == 1 else {}


def model_config(path: Path) -> dict | None:
    """The ``config.json`` beside a checkpoint file or in its folder, if readable."""
    folder = path if path.is_dir() else path.parent
    try:
        config = json.loads((folder / "config.json").read_text())
    except (OSError, ValueError, RecursionError):
        return None
    return config if isinstance(config, dict) else None


def with_tied_heads(source: TensorSource, path: Path) -> TensorSource:
    """``source`` with its tied head as an alias (:func:`tied_head_aliases`), or as it is."""
    aliases = tied_head_aliases(source.infos(), model_config(path))
    return TiedHeads(source, aliases) if aliases else source


class TiedHeads(TensorSource):
    """A base checkpoint plus aliases for the tensors its tied heads share."""

    def __init__(self, inner: TensorSource, aliases: dict[str, str]) -> None:
        self._inner, self._aliases = inner, dict(aliases)
        self.path, self.thread_safe = inner.path, inner.thread_safe

    def _target(self, name: str) -> str:
        return self._aliases.get(name, name)

    def keys(self) -> list[str]:
        return [*self._inner.keys(), *self._aliases]

    def info(self, name: str) -> TensorInfo:
        info = self._inner.info(self._target(name))
        return dataclasses.replace(info, alias_of=self._aliases[name]) \
            if name in self._aliases else info

    def get_tensor(self, name: str) -> torch.Tensor:
        return self._inner.get_tensor(self._target(name))

    def get_rows(self, name: str, start: int, stop: int) -> torch.Tensor:
        return self._inner.get_rows(self._target(name), start, stop)

    def get_expert_rows(self, name: str, expert: int, start: int, stop: int) -> torch.Tensor:
        return self._inner.get_expert_rows(self._target(name), expert, start, stop)

    def read_rows(self, name: str, start: int, stop: int, *, expert: int | None = None,
                  buffer: np.ndarray | None = None) -> np.ndarray | torch.Tensor:
        return self._inner.read_rows(self._target(name), start, stop, expert=expert,
                                     buffer=buffer)

    def mapped(self, name: str) -> bool:
        return self._inner.mapped(self._target(name))

    def will_read(self, names: Sequence[str]) -> None:
        self._inner.will_read(list(dict.fromkeys(self._target(n) for n in names)))

    @property
    def bytes_read(self) -> int | None:
        return self._inner.bytes_read

    def close(self) -> None:
        self._inner.close()
