"""A LightGPT LoRA as a peft adapter folder: adapter_config.json, adapter_model.safetensors, the chat
tokenizer's files and a README.md card, for the base's export (export.py), so that

    tokenizer = AutoTokenizer.from_pretrained(ADAPTER)
    base = AutoModelForCausalLM.from_pretrained(BASE_EXPORT, trust_remote_code=True)
    base.resize_token_embeddings(len(tokenizer))  # room for the ChatML tokens
    model = PeftModel.from_pretrained(base, ADAPTER)

computes what LightGPT's base + LoRA does. The adapters are already peft's layout (A is (rank, in), B is
(out, rank), the update scaled by alpha / rank): only their names change. The ChatML rows a chat model adds
travel as peft's trainable tokens on the tied embedding: their trained values, which replace whatever rows
resize_token_embeddings drew. The files are written here without peft (a JSON file and safetensors): the
trainers write an adapter where peft is not installed.
"""

from __future__ import annotations

import json
import os

from files import current_umask
from hub import REPOSITORY, is_hub_id
from lora import LoRAConfig

ADAPTER_CONFIG = "adapter_config.json"
ADAPTER_WEIGHTS = "adapter_model.safetensors"
PREFIX = "base_model.model."  # where peft's LoRA model keeps the model it wraps
NEW_ROWS = "token_embeddings.new"  # lora.GrownEmbedding's trained rows
TRAINABLE_TOKENS = "token_embeddings.token_adapter.trainable_tokens_delta"  # peft's name for them (their values)
PEFT_INSTALL = "pip install peft"


def peft_base_name(base_path: str) -> str:
    """What adapter_config.json's base_model_name_or_path names: the base's exported folder or hub id as given,
    or for a checkpoint file the folder `python export.py --checkpoint_path FILE` writes by default."""
    if os.path.isdir(base_path) or (not os.path.exists(base_path) and is_hub_id(base_path)):
        return base_path.rstrip("/")
    return default_export_path(base_path)


def default_export_path(source: str, suffix: str = "") -> str:
    """export.py's default --output_path: ./exports/ and the checkpoint's file name without .pt."""
    name = os.path.splitext(os.path.basename(source.rstrip("/")))[0]
    return os.path.join(".", "exports", name + suffix)


def peft_tensors(adapters: dict) -> dict:
    """A LoRA checkpoint's "adapters" under peft's names: blocks.0.attn.qkv.lora_a becomes
    base_model.model.blocks.0.attn.qkv.lora_A.weight, the new rows the embedding's trainable tokens."""
    tensors = {}
    for name, t in adapters.items():
        if name == NEW_ROWS:
            tensors[PREFIX + TRAINABLE_TOKENS] = t
        else:
            module, kind = name.rsplit(".", 1)  # "blocks.0.attn.qkv", "lora_a"
            if kind not in ("lora_a", "lora_b"):
                raise ValueError(f"not a LoRA tensor: {name}")
            tensors[f"{PREFIX}{module}.lora_{kind[-1].upper()}.weight"] = t
    return {k: t.detach().cpu().contiguous() for k, t in tensors.items()}


def adapter_config(lora: dict, base_name: str) -> dict:
    """adapter_config.json: peft's LoraConfig for the same update (targets, rank, alpha, dropout) and, for a
    chat LoRA, the ids of its new tokens as trainable tokens."""
    settings = LoRAConfig.from_dict(lora["lora"])
    vocabulary, new = lora["base"]["vocabulary_size"], len(lora["special_tokens"])
    return {"peft_type": "LORA", "task_type": "CAUSAL_LM", "base_model_name_or_path": base_name,
            "r": settings.rank, "lora_alpha": settings.alpha, "lora_dropout": settings.dropout,
            "target_modules": sorted(settings.targets), "bias": "none", "fan_in_fan_out": False,
            "use_rslora": False, "use_dora": False, "init_lora_weights": True, "inference_mode": True,
            "modules_to_save": None, "trainable_token_indices": list(range(vocabulary, vocabulary + new)) or None}


def adapter_card(lora: dict, base_name: str, where: str, license: str | None = None) -> str:
    """README.md: peft's front matter (library, base model, relation) and how to load the adapter."""
    from huggingface_hub import ModelCardData

    settings = LoRAConfig.from_dict(lora["lora"])
    data = ModelCardData(library_name="peft", base_model=base_name if is_hub_id(base_name) else None,
                         base_model_relation="adapter", pipeline_tag="text-generation",
                         tags=["lightgpt", "lora", "chat", "peft"], license=license)
    tokens = ", ".join(f"`{t}`" for t in lora["special_tokens"])
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {os.path.basename(where.rstrip('/')) or where}", "",
             f"A LoRA (rank {settings.rank}, alpha {settings.alpha:g}, on {', '.join(settings.targets)}) trained with "
             f"{REPOSITORY}'s instruction-tune.py for the base model `{base_name}` (its weights' sha256 "
             f"{lora['base']['sha256']}). The base's vocabulary ({lora['base']['vocabulary_size']:,} ids) grows by the "
             f"ChatML tokens {tokens}; their rows are peft trainable tokens.", "",
             "## Usage", "", "```python", "from peft import PeftModel",
             "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
             f"tokenizer = AutoTokenizer.from_pretrained({where!r})",
             f"base = AutoModelForCausalLM.from_pretrained({base_name!r}, trust_remote_code=True)",
             "base.resize_token_embeddings(len(tokenizer))  # room for the ChatML tokens (the adapter sets their rows)",
             f"model = PeftModel.from_pretrained(base, {where!r})",
             "prompt = tokenizer.apply_chat_template([{\"role\": \"user\", \"content\": \"Hi!\"}], "
             "add_generation_prompt=True, return_tensors=\"pt\")", "```", "",
             f"In {REPOSITORY} the LoRA checkpoint itself is the usual route: "
             f"`python generate.py --checkpoint_path BASE --lora_path LORA.pt`.", ""]
    return "\n".join(lines)


def save_peft_adapter(lora: dict, folder: str, base_name: str, where: str | None = None,
                      license: str | None = None) -> list[str]:
    """Write a LoRA checkpoint's state (load_checkpoint's, kind "lora") into an existing folder as a peft
    adapter for `base_name`, with the chat tokenizer's files where transformers is installed. Returns the
    files written."""
    from safetensors.torch import save_file

    from hf_tokenizer import HF_INSTALL, hf_available, save_tokenizer

    weights = os.path.join(folder, ADAPTER_WEIGHTS)
    save_file(peft_tensors(lora["adapters"]), weights,
              metadata={"format": "pt", "lightgpt_base_sha256": lora["base"]["sha256"]})
    os.chmod(weights, 0o666 & ~current_umask())  # safetensors makes it private (0600); a shared adapter is not
    with open(os.path.join(folder, ADAPTER_CONFIG), "w", encoding="utf-8") as f:
        json.dump(adapter_config(lora, base_name), f, indent=2)
        f.write("\n")
    with open(os.path.join(folder, "README.md"), "w", encoding="utf-8") as f:
        f.write(adapter_card(lora, base_name, where or folder, license))
    if hf_available():
        save_tokenizer(folder, lora["token_encoding"], lora["eot_id"], lora["config"]["vocabulary_size"],
                       chat=bool(lora["special_tokens"]))
    else:
        print(f"note: transformers is not installed ({HF_INSTALL}); the adapter has no tokenizer files")
    return sorted(os.listdir(folder))

