"""What the reader does with every field of PEFT's ``adapter_config.json``: one table, checked.

PEFT 0.22's ``LoraConfig`` has 43 fields. Each is in :data:`LORA_FIELDS` with what the reader
does with it:

* ``honoured`` — the merge uses it exactly as PEFT's ``merge_and_unload`` does (tested against it
  on adapters written by PEFT);
* ``ignored`` — it cannot change the merged weight matrices (metadata, training-time settings,
  which modules were targeted: the saved tensors say that);
* ``refused`` — it changes the merged weights (or leaves no merged weight at all) in a way this
  reader does not implement: an adapter that sets it away from its default is refused with an
  error naming the field, never read as something else.

A field this table does not know (written by a newer PEFT) is refused too unless it is empty.
Values are type-checked as well: ``"false"`` (a string) is not a boolean — PEFT would read it as
true — so it is refused, as are ranks and alphas that are not finite positive numbers.
Other PEFT tuner types (``peft_type`` other than ``LORA``) are refused by name
(:func:`check_peft_type`).

Example:
    >>> settings = lora_settings({"r": 8, "lora_alpha": 16}, "adapter_config.json")
    >>> settings.scale("model.layers.0.self_attn.q_proj", 8, "adapter_config.json")
    2.0
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field

from ..errors import CheckpointFormatError, UnsupportedAdapterError

HONOURED, IGNORED, REFUSED = "honoured", "ignored", "refused"

Check = Callable[[object], bool]


def _anything(value: object) -> bool:
    return True


def _is_none(value: object) -> bool:
    return value is None


def _empty(value: object) -> bool:
    """Unset as PEFT reads it: ``None``, ``false``, or an empty list/object (sub-configs: only
    ``None``, since PEFT turns ``{}`` into a default sub-config that is switched on)."""
    return value is None or value is False or value == [] or value == {}


def _boolean(value: object) -> bool:
    return value is None or isinstance(value, bool)


def _number(value: object) -> bool:
    return isinstance(value, (int, float)) and not isinstance(value, bool)


def finite_positive(value: object) -> float | None:
    """``value`` as a float when it is a finite positive JSON number, else None (booleans,
    strings, NaN, infinities and integers too large for a float are not).

    Example:
        >>> finite_positive(16), finite_positive(10**400), finite_positive("8")
        (16.0, None, None)
    """
    if not _number(value):
        return None
    try:
        number = float(value)
    except OverflowError:
        return None
    return number if 0 < number < math.inf else None


def _positive_int(value: object) -> bool:
    return isinstance(value, int) and not isinstance(value, bool) and value > 0


def _optional_str(value: object) -> bool:
    return value is None or isinstance(value, str)


def _name_list(value: object) -> bool:
    return value is None or (isinstance(value, list) and all(isinstance(v, str) for v in value))


def _object(value: object) -> bool:
    return value is None or isinstance(value, dict)


def _int_list(value: object) -> bool:
    return isinstance(value, list) and all(
        isinstance(v, int) and not isinstance(v, bool) for v in value)


def _token_indices(value: object) -> bool:
    if value is None or _int_list(value):
        return True
    return isinstance(value, dict) and all(isinstance(k, str) and _int_list(v)
                                           for k, v in value.items())


#: ``init_lora_weights`` strings PEFT 0.22 knows (prefixes: ``pissa_niter_16``, ``corda_…``).
KNOWN_INITS = ("gaussian", "eva", "orthogonal", "mica", "nora", "olora", "pissa", "corda",
               "astra", "loftq", "lora_ga")


def _init(value: object) -> bool:
    return isinstance(value, bool) or (
        isinstance(value, str) and value.lower().startswith(KNOWN_INITS))


def _bdlora(value: object) -> bool:
    if value is None:
        return True
    if not isinstance(value, dict) or not _positive_int(value.get("nblocks", 1)):
        return False
    return (_name_list(value.get("target_modules_bd_a"))
            and _name_list(value.get("target_modules_bd_b"))
            and _boolean(value.get("match_strict")))


@dataclass(frozen=True)
class FieldRule:
    """One ``LoraConfig`` field: what the reader does with it, and which values it accepts."""

    treatment: str
    """:data:`HONOURED`, :data:`IGNORED` or :data:`REFUSED`."""
    what: str
    """What the reader does with it (or why it refuses it), one line for the docs' table."""
    valid: Check = _anything
    """Whether a value has a type PEFT reads as meant; anything else is refused (ignored
    fields take any value)."""
    expected: str = ""
    """The accepted values, for the error message."""
    unset: Check = _empty
    """:data:`REFUSED` fields: the values that leave the feature off (then nothing to refuse)."""


_BOOL = dict(valid=_boolean, expected="true or false")

#: Every field of PEFT 0.22's ``LoraConfig`` (a test checks this against ``peft.LoraConfig``).
LORA_FIELDS: dict[str, FieldRule] = {
    # metadata
    "task_type": FieldRule(IGNORED, "metadata (the model's head); the saved tensors say what "
                                    "changed"),
    "peft_type": FieldRule(HONOURED, "`LORA` (or absent) is read; every other tuner type is "
                                     "refused by name", _optional_str, "a string"),
    "auto_mapping": FieldRule(IGNORED, "metadata"),
    "peft_version": FieldRule(IGNORED, "metadata"),
    "base_model_name_or_path": FieldRule(IGNORED, "named in the message when the adapter does "
                                                  "not fit BASE"),
    "revision": FieldRule(IGNORED, "metadata"),
    "inference_mode": FieldRule(IGNORED, "training-time switch"),
    # the update ΔW = s·B·A
    "r": FieldRule(HONOURED, "`s = lora_alpha / r`; must equal the rank of the saved factors",
                   _positive_int, "a positive integer"),
    "lora_alpha": FieldRule(HONOURED, "`s = lora_alpha / r`", lambda v: finite_positive(v)
                            is not None, "a finite positive number"),
    "use_rslora": FieldRule(HONOURED, "`s = lora_alpha / sqrt(r)`", **_BOOL),
    "rank_pattern": FieldRule(HONOURED, "per-module `r` (PEFT's rule: the first key whose "
                                        "regular expression matches the module path's end)",
                              _object, "an object"),
    "alpha_pattern": FieldRule(HONOURED, "per-module `lora_alpha` (same rule)", _object,
                               "an object"),
    "fan_in_fan_out": FieldRule(HONOURED, "`Conv1D` weights (stored in × out) are transposed "
                                          "whatever it says, as PEFT does; elsewhere it is "
                                          "followed where the factors fit the transposed "
                                          "weight", **_BOOL),
    "use_dora": FieldRule(HONOURED, "DoRA: `lora_magnitude_vector` rescales each merged "
                                    "vector (Eq. 5); a warning when the weights hold none",
                          **_BOOL),
    "init_lora_weights": FieldRule(HONOURED, "PiSSA, OLoRA, CorDA, Astra, LoRA-GA, LoftQ "
                                             "trained against a changed base: refused unless "
                                             "that base is given (`--adapter-base`); the "
                                             "others keep the base", _init,
                                   "true, false or one of PEFT's init names"),
    "target_parameters": FieldRule(HONOURED, "LoRA on parameters (3-D MoE expert tensors), "
                                             "per expert", _name_list,
                                   "a list of parameter names"),
    "modules_to_save": FieldRule(HONOURED, "the saved copies are read as fully fine-tuned "
                                           "weights (a tied `lm_head` against the embedding it "
                                           "shares in BASE)", _name_list,
                                 "a list of module names"),
    "trainable_token_indices": FieldRule(HONOURED, "the saved `trainable_tokens_delta` rows "
                                                   "replace those rows of the embedding (and "
                                                   "of a tied `lm_head`)", _token_indices,
                                         "a list of token ids, or an object from module name "
                                         "to such a list"),
    "use_bdlora": FieldRule(HONOURED, "BD-LoRA: the saved blocks of a block-diagonal A or B "
                                      "are put on the diagonal", _bdlora,
                            "null or an object with target_modules_bd_a/_b and nblocks"),
    "kasa_config": FieldRule(HONOURED, "KaSA: `s·B·diag(lora_diag)·A` added to the base "
                                       "truncated by its r smallest singular components",
                             _object, "null or an object"),
    "ensure_weight_tying": FieldRule(HONOURED, "tied copies are read as saved; a LoRA on both "
                                               "halves of a tied embedding is refused (PEFT "
                                               "0.21–0.22 merge it twice)", **_BOOL),
    # what the saved tensors already say, or what only training uses (any value: none of them
    # can change the merged weight matrices)
    "target_modules": FieldRule(IGNORED, "which modules were adapted: the saved tensors say it"),
    "exclude_modules": FieldRule(IGNORED, "which modules were left out: the saved tensors say "
                                          "it"),
    "layers_to_transform": FieldRule(IGNORED, "which layers were adapted: the saved tensors "
                                              "say it"),
    "layers_pattern": FieldRule(IGNORED, "which layers were adapted: the saved tensors say it"),
    "lora_dropout": FieldRule(IGNORED, "training only"),
    "bias": FieldRule(IGNORED, "`all`/`lora_only` save bias vectors: read as saved, never "
                               "analysed (biases are not weight matrices)"),
    "lora_bias": FieldRule(IGNORED, "a bias on lora_B (`lora_B.bias`) changes only the layer's "
                                    "bias, which is never analysed; the weight matrices merge "
                                    "as usual"),
    "megatron_config": FieldRule(IGNORED, "Megatron's parallel linears merge as `W + s·B·A`; "
                                          "a rank's shard of the factors does not fit BASE "
                                          "(error)"),
    "megatron_core": FieldRule(IGNORED, "the module Megatron layers come from"),
    "loftq_config": FieldRule(IGNORED, "LoftQ's settings; LoftQ itself is caught by "
                                       "`init_lora_weights`"),
    "eva_config": FieldRule(IGNORED, "initialisation only (EVA keeps the base)"),
    "corda_config": FieldRule(IGNORED, "initialisation only (CorDA is caught by "
                                       "`init_lora_weights`)"),
    "astra_config": FieldRule(IGNORED, "initialisation only (Astra is caught by "
                                       "`init_lora_weights`)"),
    "lora_ga_config": FieldRule(IGNORED, "initialisation only (LoRA-GA is caught by "
                                         "`init_lora_weights`)"),
    "velora_config": FieldRule(IGNORED, "VeLoRA compresses activations in training; it merges "
                                        "as plain LoRA (its `lora_velora_embed` is dropped)"),
    "monteclora_config": FieldRule(IGNORED, "MonteCLoRA samples A in training only; it merges "
                                            "as plain LoRA (its sampler tensors are dropped)"),
    "qalora_group_size": FieldRule(IGNORED, "only with `use_qalora` (refused)"),
    "runtime_config": FieldRule(IGNORED, "runtime only (PEFT does not save it)"),
    # changes the weights in a way not implemented here, or leaves no merged weight at all
    "use_qalora": FieldRule(REFUSED, "QALoRA's A acts on group-pooled inputs and PEFT has no "
                                     "merge for it", **_BOOL),
    "alora_invocation_tokens": FieldRule(REFUSED, "aLoRA acts only after its invocation tokens: "
                                                  "no merged weight stands for it (PEFT cannot "
                                                  "merge it)"),
    "arrow_config": FieldRule(REFUSED, "Arrow routes each token among several LoRAs: no merged "
                                       "weight stands for it (PEFT cannot merge it)",
                              unset=_is_none),
    "layer_replication": FieldRule(REFUSED, "the tuned model repeats base layers, each with its "
                                            "own adapter: its layers are not BASE's"),
}

_ADVICE = ("merge it with PEFT (model.merge_and_unload()) where PEFT can, and analyse the saved "
           "merged weights")


def check_peft_type(config: dict, where: str) -> str:
    """``peft_type`` upper-cased (``LORA`` when absent; ``DORA`` for the official DoRA code);
    any other PEFT tuner type is refused by name."""
    peft_type = config.get("peft_type", "LORA")
    if not isinstance(peft_type, str):
        raise CheckpointFormatError(f"{where}: 'peft_type' must be a string, got {peft_type!r:.80}")
    peft_type = peft_type.upper()
    if peft_type not in ("LORA", "DORA"):
        raise UnsupportedAdapterError(
            f"{where}: PEFT adapter type {peft_type:.40} is not supported (only LoRA and DoRA "
            f"adapters, peft_type LORA, are merged here); {_ADVICE}")
    return peft_type


@dataclass(frozen=True)
class BlockDiagonal:
    """BD-LoRA (``use_bdlora``): which modules store A or B as ``nblocks`` diagonal blocks."""

    a_patterns: tuple[str, ...]
    b_patterns: tuple[str, ...]
    nblocks: int

    def factor(self, module: str) -> str | None:
        """``"A"`` or ``"B"``: the factor of ``module`` PEFT made block-diagonal (its rule: a
        pattern is a substring of the module path), else None."""
        if any(p in module for p in self.a_patterns):
            return "A"
        if any(p in module for p in self.b_patterns):
            return "B"
        return None


@dataclass(frozen=True)
class LoraSettings:
    """A PEFT LoRA config, checked: the values the merge uses."""

    r: int
    alpha: float
    rslora: bool = False
    rank_pattern: dict = field(default_factory=dict)
    alpha_pattern: dict = field(default_factory=dict)
    fan_in_fan_out: bool = False
    use_dora: bool = False
    target_parameters: tuple[str, ...] = ()
    token_indices: list[int] | dict[str, list[int]] | None = None
    block_diagonal: BlockDiagonal | None = None
    kasa: bool = False

    def rank(self, module: str) -> int:
        """``r`` of one module (``rank_pattern`` first)."""
        return int(pattern_value(self.rank_pattern, module, self.r))

    def scale(self, module: str, rank: int, where: str) -> float:
        """``s`` of one module whose factors have rank ``rank``: ``alpha / r`` (rsLoRA:
        ``alpha / sqrt(r)``); ``r`` must equal ``rank``."""
        r = self.rank(module)
        if r != rank:
            by = ("rank_pattern" if pattern_value(self.rank_pattern, module, None) is not None
                  else "'r'")
            raise CheckpointFormatError(
                f"{where}: module '{module}' has rank {rank} in its weights but r = {r} by {by} "
                "in adapter_config.json; the config does not belong to these weights")
        alpha = float(pattern_value(self.alpha_pattern, module, self.alpha))
        return alpha / math.sqrt(r) if self.rslora else alpha / r

    def tokens(self, module: str, where: str) -> list[int]:
        """The token ids whose rows ``module``'s ``trainable_tokens_delta`` replaces."""
        indices = self.token_indices
        if isinstance(indices, dict):
            keys = [k for k in indices if module == k or module.endswith("." + k)]
            if len(keys) != 1:
                raise CheckpointFormatError(
                    f"{where}: 'trainable_token_indices' names no single entry for '{module}' "
                    f"(keys: {', '.join(indices) or 'none'}); the config does not belong to "
                    "these weights")
            indices = indices[keys[0]]
        if not indices:
            raise CheckpointFormatError(f"{where}: '{module}' saves trainable token rows but "
                                        "'trainable_token_indices' lists no token ids")
        return list(indices)


def pattern_value(patterns: dict, module: str, default):
    """PEFT's ``rank_pattern``/``alpha_pattern`` rule: the first key matching the module path's end.

    Example:
        >>> pattern_value({"q_proj": 16}, "model.layers.0.self_attn.q_proj", 8)
        16
    """
    for key, value in patterns.items():
        if re.match(rf"(.*\.)?({key})$", module):
            return value
    return default


def _patterns(config: dict, key: str, where: str, integers: bool) -> dict:
    """``rank_pattern``/``alpha_pattern``: regular expressions to positive numbers."""
    patterns = config.get(key) or {}
    what = "positive integer" if integers else "positive number"
    for pattern, value in patterns.items():
        try:
            re.compile(rf"(.*\.)?({pattern})$")
        except (re.error, RecursionError, OverflowError) as exc:
            raise CheckpointFormatError(f"{where}: '{key}' has an invalid regular expression "
                                        f"{pattern!r:.80} ({exc}); fix or remove it") from None
        ok = _positive_int(value) if integers else finite_positive(value) is not None
        if not ok:
            raise CheckpointFormatError(f"{where}: '{key}' gives {pattern!r:.80} the value "
                                        f"{value!r:.80}; it must be a {what}")
    return patterns


def _check_fields(config: dict, where: str) -> None:
    for key, value in config.items():
        rule = LORA_FIELDS.get(key)
        if rule is None:
            if not _empty(value):
                raise UnsupportedAdapterError(
                    f"{where}: field '{key:.80}' = {value!r:.80} is not one of PEFT 0.22's "
                    "LoraConfig fields that this reader knows (a newer PEFT?), and it may change "
                    f"the merged weights; {_ADVICE}")
            continue
        if not rule.valid(value):
            kind = "a string" if isinstance(value, str) else type(value).__name__
            raise CheckpointFormatError(
                f"{where}: '{key}' must be {rule.expected}, got {value!r:.80} ({kind}); "
                "fix the value (PEFT writes JSON true/false and numbers, never strings)")
        if rule.treatment == REFUSED and not rule.unset(value):
            raise UnsupportedAdapterError(
                f"{where}: '{key}' = {value!r:.80} is not supported: {rule.what}")


def lora_settings(config: dict, where: str) -> LoraSettings:
    """Check every field of a PEFT LoRA config (:data:`LORA_FIELDS`) and return what the merge
    uses; ``where`` names the config in errors."""
    _check_fields(config, where)
    for key in ("r", "lora_alpha"):
        if key not in config:
            raise CheckpointFormatError(f"{where}: '{key}' is missing; re-save the adapter with "
                                        "save_pretrained")
    bd = config.get("use_bdlora")
    return LoraSettings(
        r=config["r"], alpha=finite_positive(config["lora_alpha"]),
        rslora=bool(config.get("use_rslora")),
        rank_pattern=_patterns(config, "rank_pattern", where, integers=True),
        alpha_pattern=_patterns(config, "alpha_pattern", where, integers=False),
        fan_in_fan_out=bool(config.get("fan_in_fan_out")), use_dora=bool(config.get("use_dora")),
        target_parameters=tuple(config.get("target_parameters") or ()),
        token_indices=config.get("trainable_token_indices"),
        block_diagonal=None if bd is None else BlockDiagonal(
            tuple(bd.get("target_modules_bd_a") or ()), tuple(bd.get("target_modules_bd_b") or ()),
            bd.get("nblocks", 1)),
        kasa=config.get("kasa_config") is not None,
    )
