"""Parameter names: aligning two checkpoints, and reading layer index and module kind from a name.

Module kinds are a registry (first match wins): adding an architecture means adding a line to
``MODULE_KINDS``.
"""

from __future__ import annotations

import re
from collections import Counter
from dataclasses import dataclass, field

#: What PEFT puts in front of the model's names (``PeftModel.state_dict()``, saved adapters).
PEFT_PREFIX = "base_model.model."
#: Wrappers that training frameworks put in front of the model's own names.
WRAPPER_PREFIXES: tuple[str, ...] = (PEFT_PREFIX, "module.", "_orig_mod.", "model.")

#: (regex on the module path, kind). Searched in order; the first match names the kind.
MODULE_KINDS: tuple[tuple[str, str], ...] = (
    # LLaMA / Mistral / Qwen (HF names), OPT, CLIP, BART
    (r"(^|\.)q_proj$", "q"),
    (r"(^|\.)k_proj$", "k"),
    (r"(^|\.)v_proj$", "v"),
    (r"(^|\.)(o_proj|out_proj)$", "o"),
    (r"(^|\.)gate_proj$", "gate"),
    (r"(^|\.)gate_up_proj$", "gate_up"),  # fused MoE experts (transformers 5)
    (r"(^|\.)up_proj$", "up"),
    (r"(^|\.)down_proj$", "down"),
    # Mixtral's per-expert modules (transformers 4), Meta's original LLaMA names
    (r"(^|\.)experts\.\d+\.w1$", "gate"),
    (r"(^|\.)experts\.\d+\.w3$", "up"),
    (r"(^|\.)experts\.\d+\.w2$", "down"),
    (r"(^|\.)attention\.wq$", "q"),
    (r"(^|\.)attention\.wk$", "k"),
    (r"(^|\.)attention\.wv$", "v"),
    (r"(^|\.)attention\.wo$", "o"),
    (r"(^|\.)feed_forward\.w1$", "gate"),
    (r"(^|\.)feed_forward\.w3$", "up"),
    (r"(^|\.)feed_forward\.w2$", "down"),
    # torchtune's LLaMA names (its attn.q_proj, k_proj, v_proj are matched above)
    (r"(^|\.)attn\.output_proj$", "o"),
    (r"(^|\.)mlp\.w1$", "gate"),
    (r"(^|\.)mlp\.w3$", "up"),
    (r"(^|\.)mlp\.w2$", "down"),
    # BERT / RoBERTa / MiniLM (attention.output.dense before output.dense)
    (r"(^|\.)query$", "q"),
    (r"(^|\.)key$", "k"),
    (r"(^|\.)value$", "v"),
    (r"(^|\.)attention\.output\.dense$", "o"),
    (r"(^|\.)intermediate\.dense$", "up"),
    (r"(^|\.)output\.dense$", "down"),
    # DistilBERT
    (r"(^|\.)q_lin$", "q"),
    (r"(^|\.)k_lin$", "k"),
    (r"(^|\.)v_lin$", "v"),
    (r"(^|\.)out_lin$", "o"),
    # T5 attention
    (r"(^|\.)(SelfAttention|EncDecAttention)\.([qkvo])$", r"\3"),
    # GPT-2 (transformers Conv1D, stored (in, out))
    (r"(^|\.)c_attn$", "qkv"),
    (r"(^|\.)attn\.c_proj$", "o"),
    (r"(^|\.)mlp\.c_fc$", "up"),
    (r"(^|\.)mlp\.c_proj$", "down"),
    # fused projections, MLPs named fc1/fc2
    (r"(^|\.)(qkv_proj|query_key_value|Wqkv)$", "qkv"),
    (r"(^|\.)fc1$", "up"),
    (r"(^|\.)fc2$", "down"),
)
_MODULE_KINDS = tuple((re.compile(pattern), kind) for pattern, kind in MODULE_KINDS)

#: transformers ``Conv1D`` modules (GPT-2 family) store their weight as (in, out).
CONV1D_MODULES = re.compile(r"(^|\.)(c_attn|c_proj|c_fc|q_attn)$")
#: Embedding tables, stored (num_embeddings, dim): a lookup from one-hot inputs, so PEFT's DoRA
#: gives them one magnitude per embedding dimension, i.e. per stored column.
EMBEDDING_MODULES = re.compile(
    r"(^|\.)(embed_tokens|tok_embeddings|word_embeddings|position_embeddings|"
    r"token_type_embeddings|embed_positions|wte|wpe|shared)$"
)

_PARAM_SUFFIXES = (".base_layer.weight", ".weight")  # longest first


def module_path(name: str) -> str:
    """The module a parameter belongs to: ``a.b.q_proj.weight`` → ``a.b.q_proj``."""
    for suffix in _PARAM_SUFFIXES:
        if name.endswith(suffix):
            return name[: -len(suffix)]
    return name


def module_kind(name: str) -> str:
    """Module kind of a parameter name: ``q, k, v, o, gate, up, down, qkv`` or the module's name.

    Example:
        >>> module_kind("model.layers.3.self_attn.q_proj.weight")
        'q'
        >>> module_kind("encoder.layer.0.output.dense.weight")
        'down'
        >>> module_kind("lm_head.weight")
        'lm_head'
    """
    path = module_path(name)
    for pattern, kind in _MODULE_KINDS:
        match = pattern.search(path)
        if match:
            return match.expand(kind)
    return path.rsplit(".", 1)[-1]


def layer_index(name: str) -> int | None:
    """The layer (block) index: the first purely numeric component of the name, else None.

    Example:
        >>> layer_index("transformer.h.11.attn.c_attn.weight")
        11
        >>> layer_index("embed_tokens.weight") is None
        True
    """
    for part in name.split("."):
        if part.isdigit():
            return int(part)
    return None


_EXPERT_PART = re.compile(r"(^|\.)experts\.(\d+)\.")
#: Fused expert tensors: ``(num_experts, out, in)`` under an ``experts`` module (transformers 5).
_FUSED_EXPERTS = re.compile(r"(^|\.)experts\.[A-Za-z_]\w*$")


def is_expert_tensor(name: str, shape: tuple[int, ...]) -> bool:
    """A 3-D MoE tensor holding one matrix per expert (``mlp.experts.gate_up_proj``)."""
    return len(shape) == 3 and bool(_FUSED_EXPERTS.search(name))


def expert_index(name: str) -> int | None:
    """The expert of a per-expert parameter (``…experts.3.w1.weight`` → 3), else None.

    Example:
        >>> expert_index("model.layers.1.block_sparse_moe.experts.3.w1.weight")
        3
    """
    match = _EXPERT_PART.search(name)
    return int(match.group(2)) if match else None


def experts_stored_in_out(name: str, shapes: dict[str, tuple[int, ...]]) -> bool:
    """Whether a fused expert tensor is stored ``(E, in, out)`` (GPT-OSS) instead of
    ``(E, out, in)`` (Mixtral, Qwen-MoE, OLMoE, DeepSeek): told by its bias ``<name>_bias`` of
    shape ``(E, out)`` where the model has one."""
    shape, bias = shapes.get(name), shapes.get(name + "_bias")
    return (shape is not None and bias is not None and len(bias) == 2
            and bias[1] == shape[2] != shape[1])


def is_bias(name: str) -> bool:
    """A bias, whatever its shape (MoE expert biases are 2-D: ``experts.gate_up_proj_bias``)."""
    return name.endswith(("bias", "_bias"))


def is_conv1d(name: str) -> bool:
    """True for a transformers ``Conv1D`` weight (GPT-2 ``c_attn`` …), stored ``(in, out)``."""
    return bool(CONV1D_MODULES.search(module_path(name)))


def is_embedding(name: str) -> bool:
    """True for an embedding table (``embed_tokens``, ``word_embeddings``, ``wte`` …)."""
    return bool(EMBEDDING_MODULES.search(module_path(name)))


def stored_in_out(name: str) -> bool:
    """Whether a 2-D weight's output channels are its stored *columns* (PEFT's convention).

    True for ``Conv1D`` (stored ``(in, out)``) and for embeddings (``(num_embeddings, dim)``,
    whose DoRA magnitude has one entry per embedding dimension).

    Example:
        >>> stored_in_out("transformer.wte.weight"), stored_in_out("lm_head.weight")
        (True, False)
    """
    return is_conv1d(name) or is_embedding(name)


def strip_wrappers(name: str) -> str:
    """Remove leading wrapper prefixes (``base_model.model.``, ``module.``, ``model.`` …)."""
    changed = True
    while changed:
        changed = False
        for prefix in WRAPPER_PREFIXES:
            if name.startswith(prefix) and len(name) > len(prefix):
                name, changed = name[len(prefix) :], True
    return name


@dataclass
class Alignment:
    """Which base name goes with which tuned name, and what is left over on each side."""

    pairs: list[tuple[str, str]] = field(default_factory=list)
    base_only: list[str] = field(default_factory=list)
    tuned_only: list[str] = field(default_factory=list)


def _unique_map(names: list[str], key) -> dict[str, str]:
    counts = Counter(key(n) for n in names)
    return {key(n): n for n in names if counts[key(n)] == 1}


def _head_prefix(name: str) -> tuple[str, str] | None:
    head, sep, rest = name.partition(".")
    return (head + ".", rest) if sep and rest else None


def align_names(base_names: list[str], tuned_names: list[str]) -> Alignment:
    """Pair up parameter names of two checkpoints.

    In order: exact names; names equal after removing wrapper prefixes; names that differ by one
    leading component used consistently (``bert.encoder…`` vs ``encoder…``).

    Example:
        >>> a = align_names(["model.layers.0.q.weight"], ["base_model.model.layers.0.q.weight"])
        >>> a.pairs
        [('model.layers.0.q.weight', 'base_model.model.layers.0.q.weight')]
    """
    tuned_set = set(tuned_names)
    pairs = [(n, n) for n in base_names if n in tuned_set]
    done_b, done_t = {b for b, _ in pairs}, {t for _, t in pairs}
    rest_b = [n for n in base_names if n not in done_b]
    rest_t = [n for n in tuned_names if n not in done_t]

    if rest_b and rest_t:
        by_b, by_t = _unique_map(rest_b, strip_wrappers), _unique_map(rest_t, strip_wrappers)
        found = [(by_b[k], by_t[k]) for k in by_b if k in by_t]
        pairs += found
        rest_b, rest_t = _without(rest_b, rest_t, found)

    if rest_b and rest_t:
        found = _match_by_extra_head(rest_b, rest_t)
        pairs += found
        rest_b, rest_t = _without(rest_b, rest_t, found)

    return Alignment(pairs=pairs, base_only=rest_b, tuned_only=rest_t)


def _without(rest_b, rest_t, found):
    used_b, used_t = {b for b, _ in found}, {t for _, t in found}
    return [n for n in rest_b if n not in used_b], [n for n in rest_t if n not in used_t]


def _match_by_extra_head(rest_b: list[str], rest_t: list[str]) -> list[tuple[str, str]]:
    """Match names where one side carries one extra leading component, the same for all."""
    set_b, set_t = set(rest_b), set(rest_t)
    candidates: list[tuple[str, str, str, str]] = []  # (side, prefix, base, tuned)
    for t in rest_t:
        split = _head_prefix(t)
        if split and split[1] in set_b:
            candidates.append(("tuned", split[0], split[1], t))
    for b in rest_b:
        split = _head_prefix(b)
        if split and split[1] in set_t:
            candidates.append(("base", split[0], b, split[1]))
    if not candidates:
        return []
    side, prefix = Counter((c[0], c[1]) for c in candidates).most_common(1)[0][0]
    return [(b, t) for s, p, b, t in candidates if (s, p) == (side, prefix)]
