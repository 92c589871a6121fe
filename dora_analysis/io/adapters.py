"""Low-rank adapters (LoRA, DoRA) read from the tools that wrote them and merged as they are read.

Every format is turned into one :class:`LowRankUpdate` per adapted weight, written in PEFT's
orientation — the weight as ``(out, in_flat)`` — whatever the stored layout::

    LoRA (Eq. 1):  W' = W0 + s · B @ A                     A: (r, in_flat), B: (out, r)
    DoRA (Eq. 5):  W' = m · (W0 + s · B @ A) / ||W0 + s · B @ A||   (norm per output channel)

with ``s = alpha / r`` (``alpha / sqrt(r)`` with rsLoRA). LyCORIS may normalise per *input*
feature instead (``magnitude_axis="in"``).

Formats (detected from the tensor names; see :mod:`dora_analysis.io.detect`):

* ``peft`` — ``adapter_config.json`` + ``adapter_model.safetensors`` (or ``.bin``):
  ``<module>.lora_A.weight`` (r, in), ``lora_B.weight`` (out, r), ``lora_magnitude_vector`` (DoRA),
  embeddings ``lora_embedding_A`` (r, num_embeddings) / ``lora_embedding_B`` (dim, r); KaSA's
  ``lora_diag``, BD-LoRA's block-diagonal factors and trainable tokens'
  ``trainable_tokens_delta`` too. What each field of ``adapter_config.json`` does is one table,
  :data:`~dora_analysis.io.peft_config.LORA_FIELDS` (honoured, ignored, or refused by name);
  ``modules_to_save`` weights are full fine-tuned weights.
* ``nvlabs`` — the official DoRA code: ``lora_A``/``lora_B`` plus ``weight_m_wdecomp.weight``
  (out, 1), scaling ``lora_alpha / r`` from its ``adapter_config.json``; a module with only
  ``weight_m_wdecomp`` is magnitude-only (paper Table 6): ``W' = m · W0 / ||W0||``.
* ``torchtune`` — ``<module>.lora_a.weight``, ``lora_b.weight``, ``magnitude`` with torchtune's
  module names (``layers.0.attn.q_proj``, ``mlp.w1`` …, mapped to Hugging Face names when the
  base uses them); torchtune does not store alpha, so ``lora_alpha`` must be given.
* ``lycoris`` — LyCORIS / kohya: ``<module>.lora_down.weight`` (r, in), ``lora_up.weight``
  (out, r), ``alpha`` (scalar; absent → ``alpha = r``), ``dora_scale`` of shape ``(out, 1)``
  (per output channel) or ``(1, in)`` (LyCORIS' default, per input feature); module names either
  dotted or kohya-flattened (``lora_te_text_model_encoder_layers_0_self_attn_q_proj``).
"""

from __future__ import annotations

import dataclasses
import json
import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import torch

from ..columns import Axis
from ..errors import CheckpointFormatError, ConfigError, UnsupportedAdapterError
from .detect import (  # noqa: F401 - re-exported: where readers looked for them
    ADAPTER_WEIGHT_FILES,
    adapter_format,
    has_adapter_weights,
    is_adapter_folder,
)
from .factors import LowRankUpdate
from .guard import shown
from .jsonfile import parse_json_object, read_json_object
from .keys import PEFT_PREFIX
from .peft_config import LoraSettings, check_peft_type, finite_positive, lora_settings
from .safetensors import SafetensorsFile
from .torch_bin import TorchFile

F64 = torch.float64


@dataclass
class Adapter:
    """Everything one adapter checkpoint says about the weights it changes."""

    format: str
    path: Path
    updates: dict[str, LowRankUpdate]
    """Adapted module path (adapter's own naming, wrappers removed) → its update."""
    full_weights: dict[str, torch.Tensor] = field(default_factory=dict)
    """Weights saved whole (PEFT ``modules_to_save``): fully fine-tuned, compared as such."""
    base_model: str | None = None
    module_aliases: Callable[[str], list[str]] = lambda path: []
    """Other names the base may give an adapted module (torchtune → Hugging Face names)."""
    base_order: Callable[[str, str, LowRankUpdate, Callable[[], tuple[int, int]]],
                         LowRankUpdate] = lambda module, base_name, update, heads: update
    """``(module, base weight name, update, heads)`` → the update in the base's row order;
    ``heads()`` gives the base's ``(num_attention_heads, num_key_value_heads)`` (torchtune keeps
    q/k rows in Meta's RoPE order)."""
    target_parameters: tuple[str, ...] = ()
    """PEFT ``target_parameters``: parameters adapted directly (MoE expert tensors), whose
    modules are named by their owner plus one ``.base_layer`` per nesting level."""
    notes: list[str] = field(default_factory=list)
    """What the reader noticed that changes how the numbers read (``use_dora`` without
    magnitudes …): warned once per run by the analysis's plan, not on every opening."""

    @property
    def method(self) -> str:
        """``dora`` when any module carries a magnitude, else ``lora``."""
        return "dora" if any(u.magnitude is not None for u in self.updates.values()) else "lora"


# --- reading adapter files -----------------------------------------------------------------

def load_tensors(path: Path) -> dict[str, torch.Tensor]:
    """All tensors of a (small) adapter file: safetensors, or a pickle via weights_only."""
    reader = SafetensorsFile(path) if path.suffix == ".safetensors" else TorchFile(path)
    with reader as src:
        return {name: src.get_tensor(name) for name in src.keys()}


def _weights_file(folder: Path) -> Path:
    for name in ADAPTER_WEIGHT_FILES:
        if (folder / name).is_file():
            return folder / name
    raise CheckpointFormatError(
        f"{folder}: adapter folder without weights (expected one of "
        f"{', '.join(ADAPTER_WEIGHT_FILES)}); copy the adapter's weight file next to its config"
    )


def parse_config(text: str | bytes, path) -> dict:
    """An ``adapter_config.json``'s content as a dict (``path`` only names it in errors)."""
    return parse_json_object(text, path, what="broken adapter config",
                             fix="re-save the adapter with save_pretrained")


def read_config(folder: Path) -> dict:
    """The ``adapter_config.json`` in ``folder``, as a dict."""
    return _read_config(folder)


def _read_config(folder: Path) -> dict:
    return read_json_object(folder / "adapter_config.json", what="broken adapter config",
                            fix="re-save the adapter with save_pretrained")


def _f64(t: torch.Tensor) -> torch.Tensor:
    return t.detach().to(F64)


def _config_number(config: dict, key: str, folder: Path) -> float:
    value = finite_positive(config.get(key))
    if value is None:
        raise CheckpointFormatError(f"{shown(folder / 'adapter_config.json')}: '{key}' must be a "
                                    f"finite positive number, got {config.get(key)!r:.80}")
    return value


_PEFT_KEY = re.compile(
    r"^(?P<module>.+?)\.(?P<part>lora_A\.weight|lora_B\.weight|lora_embedding_A|lora_embedding_B|"
    r"lora_magnitude_vector(?:\.weight)?|weight_m_wdecomp\.weight|lora_diag|lora_B\.bias|"
    r"token_adapter\.trainable_tokens_delta|lora_velora_embed|lora_monteclora_sampler\..+)$"
)
#: Adapter tensors PEFT saves that do not enter the merged weight matrices: part → why.
PEFT_UNMERGED_PARTS: dict[str, str] = {
    "lora_B.bias": "lora_bias: changes only the layer's bias",
    "lora_velora_embed": "VeLoRA: training-time activation compression",
    "lora_monteclora_sampler": "MonteCLoRA: training-time sampler",
}
#: A name part that marks a tensor as an adapter's own (not a ``modules_to_save`` copy).
_ADAPTER_PART = re.compile(r"(^|\.)(lora_|token_adapter\.)")


def _group(tensors: dict[str, torch.Tensor], pattern: re.Pattern) -> tuple[dict, dict]:
    """Split adapter tensors into ``{module: {part: tensor}}`` and everything else."""
    modules: dict[str, dict[str, torch.Tensor]] = {}
    rest = {}
    for key, value in tensors.items():
        name = key.removeprefix(PEFT_PREFIX)
        match = pattern.match(name)
        if match:
            part = match.group("part").removesuffix(".weight")
            modules.setdefault(match.group("module"), {})[part] = value
        else:
            rest[name] = value
    return modules, rest


def _pair_or_error(parts: dict, a: str, b: str, module: str, path: Path):
    if (a in parts) != (b in parts):
        missing = b if a in parts else a
        raise CheckpointFormatError(f"{path}: module '{module}' has no '{missing}' tensor; "
                                    "the adapter file is incomplete")
    return parts.get(a), parts.get(b)


def _as_2d_factors(a: torch.Tensor, b: torch.Tensor, names: tuple[str, str], module: str,
                   path: Path) -> tuple[torch.Tensor, torch.Tensor]:
    # Conv adapters: A (r, in, *k), B (out, r, 1...) — the update is B.view(out, r) @ A.view(r, -1).
    a2 = a.detach().reshape(a.shape[0], -1) if a.dim() else a
    b2 = b.detach().reshape(b.shape[0], -1) if b.dim() else b
    if a.dim() < 2 or b.dim() < 2 or a2.shape[0] != b2.shape[1]:
        raise CheckpointFormatError(
            f"{shown(path)}: module '{module}': {names[0]} {list(a.shape)} and {names[1]} "
            f"{list(b.shape)} do not share a rank (expected ({names[0]}: r × in, {names[1]}: "
            "out × r)); the adapter file is corrupt or mixes two adapters")
    return a2, b2


#: ``init_lora_weights`` values (prefixes) whose adapters were trained against a changed base:
#: prefix → (method, the base they were trained on). PEFT's ``pissa_init``/``olora_init``/
#: ``corda_init``/``astra_init``/``lora_ga_init`` subtract ``s·B0·A0`` from the base weight;
#: LoftQ replaces it with its quantized form. ``eva`` (lora_B zeroed), ``orthogonal``
#: (B0·A0 = 0), ``mica`` (lora_A zeroed), ``nora`` (lora_B zeroed), ``gaussian`` and ``true``
#: leave the base as it was: ΔW = s·B·A exactly.
BASE_CHANGING_INITS: dict[str, tuple[str, str]] = {
    "pissa": ("PiSSA", "the residual base W0 - s·B0·A0"),
    "olora": ("OLoRA", "the residual base W0 - s·B0·A0"),
    "corda": ("CorDA", "the residual base W0 - s·B0·A0"),
    "astra": ("Astra", "the residual base W0 - s·B0·A0"),
    "lora_ga": ("LoRA-GA", "the residual base W0 - s·B0·A0"),
    "loftq": ("LoftQ", "LoftQ's quantized base"),
}


def base_changing_init(config: dict) -> tuple[str, str, str] | None:
    """``(init, method, trained-on)`` when ``init_lora_weights`` means the adapter was trained
    against a changed base, else None.

    Example:
        >>> base_changing_init({"init_lora_weights": "pissa_niter_16"})[1]
        'PiSSA'
    """
    init = config.get("init_lora_weights", True)
    if not isinstance(init, str):
        return None
    for prefix, (method, trained_on) in BASE_CHANGING_INITS.items():
        if init.lower().startswith(prefix):
            return init, method, trained_on
    return None


def _check_init(config: dict, folder, adapter_base_given: bool) -> None:
    found = base_changing_init(config)
    if found is None or adapter_base_given:
        return
    init, method, trained_on = found
    converted = ("; or re-save it with PEFT's save_pretrained(path_initial_model_for_weight_"
                 "conversion=…), which writes ΔW as a plain LoRA" if method != "LoftQ" else "")
    raise ConfigError(
        f"{folder}: adapter initialised with init_lora_weights='{init}' ({method}) was trained "
        f"against {trained_on}, not the pre-trained weights, so merging it into BASE would give "
        f"wrong numbers; pass the base it was trained on with --adapter-base (adapter_base=)"
        f"{converted}")


def read_peft(folder: Path, adapter_base_given: bool = False, **_) -> Adapter:
    """A PEFT LoRA/DoRA adapter folder (or the official DoRA code's, which PEFT grew from).

    Adapters trained against a changed base (:data:`BASE_CHANGING_INITS`) are refused unless
    ``adapter_base_given``: the caller then merges them into that base.
    """
    config = _read_config(folder)
    weights = _weights_file(folder)
    return peft_adapter(config, load_tensors(weights), folder, weights, adapter_base_given)


def peft_adapter(config: dict, tensors: dict[str, torch.Tensor], folder, weights,
                 adapter_base_given: bool = False) -> Adapter:
    """A PEFT (or official DoRA) adapter from its config and tensors; ``folder`` and ``weights``
    (local paths or remote URLs) name it in messages.

    Every config field is checked first (:mod:`~dora_analysis.io.peft_config`); every tensor is
    a factor of an adapted module, a part PEFT does not merge into weight matrices
    (:data:`PEFT_UNMERGED_PARTS`), a saved base copy, or a ``modules_to_save`` weight — an
    adapter tensor of any other kind is refused by name.
    """
    where = shown(folder / "adapter_config.json")
    peft_type = check_peft_type(config, where)
    if peft_type == "DORA" or any(k.endswith("weight_m_wdecomp.weight") for k in tensors):
        return _read_nvlabs(folder, config, tensors)
    settings = lora_settings(config, where)
    _check_init(config, folder, adapter_base_given)
    modules, rest = _group(tensors, _PEFT_KEY)
    updates = {}
    for module, parts in modules.items():
        update = _peft_update(module, parts, settings, weights, where)
        if update is not None:
            updates[module] = update
    if not updates:
        raise CheckpointFormatError(f"{weights}: no lora_A/lora_B tensors found")
    # Saved base copies (embedding layers saved alongside) are not changes; the rest are
    # modules_to_save, trained in full.
    full = {k: v for k, v in rest.items() if ".base_layer." not in k}
    unknown = sorted(k for k in full if _ADAPTER_PART.search(k))
    if unknown:
        raise UnsupportedAdapterError(
            f"{weights}: adapter tensor(s) of a kind this reader does not merge "
            f"({', '.join(unknown[:3])}{' …' if len(unknown) > 3 else ''}); merge the adapter "
            "with PEFT (model.merge_and_unload()) and analyse the saved merged weights")
    adapter = Adapter("peft", folder, updates, full,
                      base_model=config.get("base_model_name_or_path"),
                      target_parameters=settings.target_parameters)
    if settings.use_dora and adapter.method != "dora":
        adapter.notes.append(
            f"{weights}: adapter_config.json says use_dora but the weights hold no "
            "lora_magnitude_vector (Megatron-Bridge's PEFT export wrote such files); it is read as "
            "LoRA, so the numbers are not those of the trained DoRA model")
    if "use_dora" not in config and adapter.method == "dora":
        # PEFT always writes use_dora; DoRA magnitudes without it come from torchtune's PEFT
        # export, which permutes q/k lora_B to Hugging Face's RoPE row order but not magnitude.
        adapter.base_order = meta_rope_to_hf(("magnitude",), always=True)
    return adapter


def _peft_update(module: str, parts: dict[str, torch.Tensor], settings: LoraSettings, weights,
                 where: str) -> LowRankUpdate | None:
    """One module's update from its saved parts; None when it saves only parts PEFT does not
    merge into the weight (:data:`PEFT_UNMERGED_PARTS`)."""
    parts = {p: t for p, t in parts.items() if not p.startswith(tuple(PEFT_UNMERGED_PARTS))}
    tokens = parts.pop("token_adapter.trainable_tokens_delta", None)
    if tokens is not None:
        if parts:
            raise CheckpointFormatError(f"{weights}: module '{module}' saves both LoRA tensors "
                                        "and trainable token rows (PEFT writes either)")
        return _token_update(module, tokens, settings, weights, where)
    if not parts:
        return None
    embedding = "lora_embedding_A" in parts or "lora_embedding_B" in parts
    names = ("lora_embedding_A", "lora_embedding_B") if embedding else ("lora_A", "lora_B")
    a, b = _pair_or_error(parts, *names, module, weights)
    if a is None:
        raise CheckpointFormatError(f"{weights}: module '{module}' has "
                                    f"{' and '.join(sorted(parts))} but no lora_A/lora_B")
    a, b = _block_diagonal(module, a, b, settings, weights)
    a2, b2 = _as_2d_factors(a, b, names, module, weights)
    rank = a2.shape[0]
    if settings.target_parameters and rank % settings.rank(module) == 0:
        rank = settings.rank(module)  # A stacks r rows per MoE expert
    magnitude = parts.get("lora_magnitude_vector")
    update = LowRankUpdate(
        lora_a=a2, lora_b=b2, scale=settings.scale(module, rank, where),
        magnitude=None if magnitude is None else _f64(magnitude).flatten(),
        stored_in_out=embedding, fan_in_fan_out=settings.fan_in_fan_out, dtype=a.dtype)
    return _kasa(module, update, parts.get("lora_diag"), settings, weights)


def _block_diagonal(module: str, a: torch.Tensor, b: torch.Tensor, settings: LoraSettings,
                    weights) -> tuple[torch.Tensor, torch.Tensor]:
    """BD-LoRA saves a block-diagonal factor as its ``nblocks`` blocks stacked: A ``(r, in/n)``
    or B ``(out, r/n)``; the factor is those blocks on the diagonal (PEFT's
    ``weight_as_blockdiagonal_matrix``)."""
    bd = settings.block_diagonal
    which = None if bd is None else bd.factor(module)
    if which is None:
        return a, b
    blocks = a if which == "A" else b
    if blocks.dim() != 2 or blocks.shape[0] % bd.nblocks:
        raise CheckpointFormatError(
            f"{weights}: module '{module}': a block-diagonal lora_{which} (use_bdlora) of shape "
            f"{list(blocks.shape)} does not split into nblocks = {bd.nblocks} row blocks")
    full = torch.block_diag(*torch.chunk(blocks.detach(), bd.nblocks, dim=0))
    return (full, b) if which == "A" else (a, full)


def _kasa(module: str, update: LowRankUpdate, diag: torch.Tensor | None, settings: LoraSettings,
          weights) -> LowRankUpdate:
    """KaSA: ``ΔW = s · B @ diag(lora_diag) @ A`` on a base truncated by its ``r`` smallest
    singular components (PEFT's ``KasaLinearVariant``); the diagonal is folded into B."""
    if diag is None and not settings.kasa:
        return update
    if diag is None or not settings.kasa:
        has = "kasa_config but no lora_diag" if diag is None else "lora_diag but no kasa_config"
        raise CheckpointFormatError(f"{weights}: module '{module}' has {has}; the config does "
                                    "not belong to these weights")
    if update.magnitude is not None or update.stored_in_out or diag.numel() != update.rank:
        raise CheckpointFormatError(
            f"{weights}: module '{module}': KaSA's lora_diag ({diag.numel()} values) fits only a "
            f"linear layer's rank-{update.rank} factors without a DoRA magnitude")
    update.lora_b = update.lora_b.to(F64) * _f64(diag).flatten()[None, :]  # (out, r) · diag
    update.truncate_base = update.rank
    return update


def _token_update(module: str, rows: torch.Tensor, settings: LoraSettings, weights,
                  where: str) -> LowRankUpdate:
    """PEFT's trainable tokens: the saved rows replace rows ``ids`` of the weight."""
    ids = settings.tokens(module, where)
    if rows.dim() != 2 or rows.shape[0] != len(ids):
        raise CheckpointFormatError(
            f"{weights}: '{module}' saves {list(rows.shape)} trainable token rows for "
            f"{len(ids)} token ids in trainable_token_indices; the config does not belong to "
            "these weights")
    if len(set(ids)) != len(ids):
        raise CheckpointFormatError(f"{where}: trainable_token_indices of '{module}' repeats a "
                                    "token id; PEFT's merge would be ambiguous")
    return LowRankUpdate(None, None, 1.0, token_rows=(torch.tensor(ids), rows.detach()),
                         dtype=rows.dtype)


def _read_nvlabs(folder: Path, config: dict, tensors: dict) -> Adapter:
    modules, rest = _group(tensors, _PEFT_KEY)
    r = _config_number(config, "r", folder)
    scale = _config_number(config, "lora_alpha", folder) / r
    updates = {}
    for module, parts in modules.items():
        a, b = _pair_or_error(parts, "lora_A", "lora_B", module, folder)
        m = parts.get("weight_m_wdecomp")
        a2, b2 = (_as_2d_factors(a, b, ("lora_A", "lora_B"), module, folder) if a is not None
                  else (None, None))
        dtype = (a if a is not None else m).dtype
        updates[module] = LowRankUpdate(a2, b2, scale, None if m is None else _f64(m).flatten(),
                                        dtype=dtype)
    return Adapter("nvlabs", folder, updates, {},
                   base_model=config.get("base_model_name_or_path"))


_TORCHTUNE_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_a\.weight|lora_b\.weight|magnitude)$")

#: torchtune's LLaMA-family module names → Hugging Face's (regex, replacement).
TORCHTUNE_TO_HF: tuple[tuple[str, str], ...] = (
    (r"^tok_embeddings$", "model.embed_tokens"),
    (r"^output$", "lm_head"),
    (r"^layers\.(\d+)\.attn\.(q|k|v)_proj$", r"model.layers.\1.self_attn.\2_proj"),
    (r"^layers\.(\d+)\.attn\.output_proj$", r"model.layers.\1.self_attn.o_proj"),
    (r"^layers\.(\d+)\.mlp\.w1$", r"model.layers.\1.mlp.gate_proj"),
    (r"^layers\.(\d+)\.mlp\.w2$", r"model.layers.\1.mlp.down_proj"),
    (r"^layers\.(\d+)\.mlp\.w3$", r"model.layers.\1.mlp.up_proj"),
)


def meta_to_hf_rows(t: torch.Tensor, n_heads: int) -> torch.Tensor:
    """Rows of a q/k projection from Meta's RoPE order (torchtune) to Hugging Face's: the
    permutation of torchtune's ``convert_weights.tune_to_hf``, per head ``(d/2, 2) → (2, d/2)``.

    Example:
        >>> meta_to_hf_rows(torch.arange(4.0), 1).tolist()
        [0.0, 2.0, 1.0, 3.0]
    """
    head_dim = t.shape[0] // n_heads
    return (t.reshape(n_heads, head_dim // 2, 2, *t.shape[1:]).transpose(1, 2)
            .reshape(t.shape).contiguous())


_QK = re.compile(r"(^|\.)(?P<kind>q|k)_proj$")


def meta_rope_to_hf(parts: tuple[str, ...], always: bool = False):
    """An :attr:`Adapter.base_order` that permutes ``parts`` (``lora_b``, ``magnitude``) of q/k
    modules into Hugging Face's row order: ``always``, or when the base names the weight
    differently from the adapter (a Hugging Face base for torchtune module names)."""
    def order(module: str, base_name: str, update: LowRankUpdate, heads) -> LowRankUpdate:
        match = _QK.search(module)
        if not match or (not always and base_name == module + ".weight"):
            return update
        n_heads, n_kv = heads()
        n = n_heads if match.group("kind") == "q" else n_kv
        b, m = update.lora_b, update.magnitude
        if "lora_b" in parts and b is not None:
            b = meta_to_hf_rows(b, n)
        if "magnitude" in parts and m is not None:
            m = meta_to_hf_rows(m, n)
        return dataclasses.replace(update, lora_b=b, magnitude=m)
    return order


def config_heads(base_path) -> tuple[int, int]:
    """``(num_attention_heads, num_key_value_heads)`` from the ``config.json`` beside a base."""
    folder = Path(base_path) if Path(base_path).is_dir() else Path(base_path).parent
    try:
        config = json.loads((folder / "config.json").read_text())
        heads = int(config["num_attention_heads"])
        return heads, int(config.get("num_key_value_heads") or heads)
    except (OSError, ValueError, KeyError, TypeError, RecursionError):
        raise CheckpointFormatError(
            f"{base_path}: torchtune adapters keep q/k rows in Meta's RoPE order; reordering "
            "them for this Hugging Face base needs num_attention_heads from the base's "
            f"config.json, not found in {folder}; put the model's config.json there") from None


def torchtune_aliases(module: str) -> list[str]:
    """Hugging Face names of a torchtune module path (``layers.0.mlp.w1`` → ``…gate_proj``)."""
    return [re.sub(p, r, module) for p, r in TORCHTUNE_TO_HF if re.match(p, module)]


def read_torchtune(path: Path, tensors: dict, lora_alpha: float | None = None, **_) -> Adapter:
    if lora_alpha is None:
        raise ConfigError(f"{path}: torchtune adapters do not store lora_alpha; give it with "
                          "--lora-alpha (torchtune's recipes default to 16)")
    modules, _rest = _group(tensors, _TORCHTUNE_KEY)
    updates = {}
    for module, parts in modules.items():
        a, b = _pair_or_error(parts, "lora_a", "lora_b", module, path)
        if a is None:
            raise CheckpointFormatError(f"{shown(path)}: module '{module}' has a magnitude but no "
                                        "lora_a/lora_b")
        a2, b2 = _as_2d_factors(a, b, ("lora_a", "lora_b"), module, path)
        m = parts.get("magnitude")
        updates[module] = LowRankUpdate(a2, b2, lora_alpha / a2.shape[0],
                                        None if m is None else _f64(m).flatten(), dtype=a.dtype)
    return Adapter("torchtune", path, updates, module_aliases=torchtune_aliases,
                   base_order=meta_rope_to_hf(("lora_b", "magnitude")))


_LYCORIS_KEY = re.compile(r"^(?P<module>.+)\.(?P<part>lora_down\.weight|lora_up\.weight|alpha|"
                          r"dora_scale)$")
KOHYA_PREFIXES = ("lora_unet_", "lora_te1_", "lora_te2_", "lora_te_", "lora_transformer_",
                  "lycoris_", "lora_")


def read_lycoris(path: Path, tensors: dict, **_) -> Adapter:
    modules, _rest = _group(tensors, _LYCORIS_KEY)
    updates = {}
    for module, parts in modules.items():
        a, b = _pair_or_error(parts, "lora_down", "lora_up", module, path)
        if a is None:
            raise CheckpointFormatError(f"{path}: module '{module}' has no lora_down/lora_up")
        a2, b2 = _as_2d_factors(a, b, ("lora_down", "lora_up"), module, path)
        rank = a2.shape[0]
        alpha = float(parts["alpha"]) if "alpha" in parts else float(rank)
        update = LowRankUpdate(a2, b2, alpha / rank, dtype=a.dtype)
        if "dora_scale" in parts:
            update.magnitude, update.magnitude_axis = _lycoris_magnitude(
                parts["dora_scale"], b2.shape[0], a2.shape[1], a.dim(), module, path)
        updates[module] = update
    return Adapter("lycoris", path, updates)


def _lycoris_magnitude(scale: torch.Tensor, out: int, in_flat: int, a_dim: int, module: str,
                       path: Path) -> tuple[torch.Tensor, Axis]:
    shape = tuple(scale.shape)
    if shape[0] == out and all(d == 1 for d in shape[1:]):
        return _f64(scale).flatten(), "out"
    if shape[0] == 1 and len(shape) > 1 and shape[1] * math.prod(shape[2:]) in (in_flat,):
        if a_dim > 2:
            raise CheckpointFormatError(
                f"{path}: '{module}': LyCORIS DoRA on a conv weight per input channel is not "
                "supported; analyse the merged weights instead")
        return _f64(scale).flatten(), "in"
    raise CheckpointFormatError(f"{path}: '{module}': dora_scale of shape {list(shape)} fits "
                                f"neither (out={out}, 1) nor (1, in={in_flat})")


#: Readers of single adapter files without a PEFT config, by the format
#: :func:`~dora_analysis.io.detect.adapter_format` recognises from their keys.
ADAPTER_READERS: dict[str, Callable[..., Adapter]] = {
    "torchtune": read_torchtune,
    "lycoris": read_lycoris,
}


def read_adapter_file(path: Path, tensors: dict, **options) -> Adapter:
    """A single adapter file (torchtune, LyCORIS/kohya), its format detected from its keys."""
    reader = ADAPTER_READERS.get(adapter_format(list(tensors)))
    if reader is None:
        raise CheckpointFormatError(f"{path}: not an adapter file")
    return reader(path, tensors, **options)


def kohya_flat(path: str) -> str:
    """kohya's flattened module name: dots become underscores."""
    return path.replace(".", "_")


def strip_kohya_prefix(module: str) -> str:
    for prefix in KOHYA_PREFIXES:
        if module.startswith(prefix):
            return module[len(prefix):]
    return module
