"""A LoRA as a peft adapter folder (peft_adapter.py): written by instruction-tune.py after training and by
export.py --peft_adapter, loaded by transformers + peft on the base's export, it computes what LightGPT's
base + LoRA does, and its tokenizer renders chats as chat.render_prompt does."""

import json
import os

import pytest
import torch
from conftest import fails_with_one_line

import export
from chat import ChatTokenizer, render_prompt
from checkpoint import LORA_ENTRIES, load_checkpoint
from data import load_encoding
from generate import inference_model
from lora import adapted_model
from checkpoint import model_from_checkpoint
from peft_adapter import ADAPTER_CONFIG, ADAPTER_WEIGHTS, peft_tensors


def run_export(*argv) -> str:
    return export.main(export.parse_args(list(argv)))


def peft_model(base_folder: str, adapter: str, tokenizer_folder: str | None = None):
    """The documented route: the chat tokenizer from the adapter (or, for an adapter written without the
    transformers extra, from the chat model's export), the base grown to its size, the adapter."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokenizer = AutoTokenizer.from_pretrained(tokenizer_folder or adapter, trust_remote_code=True)
    base = AutoModelForCausalLM.from_pretrained(base_folder, trust_remote_code=True)
    base.resize_token_embeddings(len(tokenizer))
    return PeftModel.from_pretrained(base, adapter).eval(), tokenizer


def test_the_tuned_lora_loads_in_peft_as_base_plus_adapters(base, tuned, tmp_path):
    """instruction-tune.py's adapter folder on export.py's base: PeftModel's logits are LightGPT's base +
    LoRA's (unmerged and merged) within 1e-5, merge_and_unload too, and the tokenizer's chat template gives
    render_prompt's ids."""
    out, _ = tuned
    adapter = str(out / "lora-peft")
    assert sorted(os.listdir(adapter)) == ["README.md", ADAPTER_CONFIG, ADAPTER_WEIGHTS, "chat_template.jinja",
                                           "tokenizer.json", "tokenizer_config.json"]
    config = json.load(open(os.path.join(adapter, ADAPTER_CONFIG)))
    lora = load_checkpoint(str(out / "lora.pt"), "lora", required=LORA_ENTRIES)
    assert (config["r"], config["lora_alpha"], config["peft_type"]) == (4, 8.0, "LORA")
    assert config["trainable_token_indices"] == [257, 258, 259]
    assert config["base_model_name_or_path"] == os.path.join(".", "exports", "base")  # export.py's default for base.pt
    folder = run_export("--checkpoint_path", base, "--output_path", str(tmp_path / "base"))
    theirs, tokenizer = peft_model(folder, adapter)
    unmerged = adapted_model(model_from_checkpoint(load_checkpoint(base, "pretrain")), lora).eval()
    merged = inference_model(base, torch.device("cpu"), str(out / "lora.pt"))[0]
    ids = torch.randint(0, 260, (2, 23), generator=torch.Generator().manual_seed(0))
    with torch.no_grad():
        expected = unmerged(ids)
        assert (theirs(ids).logits - expected).abs().max() <= 1e-5
        assert (merged(ids) - expected).abs().max() <= 1e-5
        assert (theirs.merge_and_unload()(ids).logits - expected).abs().max() <= 1e-5
    chat = ChatTokenizer(load_encoding("bytes"))
    conversation = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say river now."}]
    assert tokenizer.apply_chat_template(conversation, add_generation_prompt=True, tokenize=True,
                                         return_dict=True)["input_ids"] == render_prompt(chat, conversation)


def test_export_writes_the_adapter_for_the_bases_folder(base, tuned, tmp_path, capsys):
    """export.py --peft_adapter on the base's export names that folder as the adapter's base, writes the same
    tensors as instruction-tune.py, and a card that says how to load it."""
    out, _ = tuned
    folder = run_export("--checkpoint_path", base, "--output_path", str(tmp_path / "base"))
    adapter = run_export("--checkpoint_path", folder, "--lora_path", str(out / "lora.pt"), "--peft_adapter",
                         "--output_path", str(tmp_path / "adapter"))
    assert json.load(open(os.path.join(adapter, ADAPTER_CONFIG)))["base_model_name_or_path"] == folder
    from safetensors.torch import load_file

    written, trained = load_file(os.path.join(adapter, ADAPTER_WEIGHTS)), load_file(str(out / "lora-peft" / ADAPTER_WEIGHTS))
    assert written.keys() == trained.keys() and all(torch.equal(written[k], trained[k]) for k in written)
    card = open(os.path.join(adapter, "README.md")).read()
    assert "library_name: peft" in card and "base_model_relation: adapter" in card
    assert "PeftModel.from_pretrained" in card and "resize_token_embeddings" in card
    assert "wrote" in capsys.readouterr().out
    fails_with_one_line(capsys, export, ["--checkpoint_path", base, "--peft_adapter"], "--peft_adapter: it needs --lora_path")


def test_peft_names_every_tensor_or_refuses_it():
    """Each LoRA tensor has peft's name; a tensor LoRA never trains is refused rather than renamed."""
    a, b, rows = torch.zeros(2, 8), torch.zeros(8, 2), torch.zeros(3, 8)
    names = peft_tensors({"blocks.0.attn.qkv.lora_a": a, "blocks.0.attn.qkv.lora_b": b, "token_embeddings.new": rows})
    assert set(names) == {"base_model.model.blocks.0.attn.qkv.lora_A.weight",
                          "base_model.model.blocks.0.attn.qkv.lora_B.weight",
                          "base_model.model.token_embeddings.token_adapter.trainable_tokens_delta"}
    with pytest.raises(ValueError, match="not a LoRA tensor"):
        peft_tensors({"blocks.0.attn.qkv.weight": a})


def test_a_bad_peft_path_is_one_line(base, chats, tmp_path, capsys):
    import importlib

    from conftest import tune_args

    tune = importlib.import_module("instruction-tune")
    (tmp_path / "file").write_text("x")
    (tmp_path / "other").mkdir()
    (tmp_path / "other" / "notes.txt").write_text("mine")
    for path, why in ((tmp_path / "file", "is a file"), (tmp_path / "other", "holds other files")):
        fails_with_one_line(capsys, tune, tune_args(base, chats, tmp_path, "--peft_path", str(path)), why)
    assert (tmp_path / "other" / "notes.txt").read_text() == "mine"


def test_an_adapter_for_another_base_or_a_base_transformers_cannot_load_is_one_line(base, tuned, checkpoint,
                                                                                     tmp_path, capsys):
    """export.py --peft_adapter: a LoRA trained on another base, and a base folder without the modeling file
    (an older export), end in one line and write nothing."""
    out, _ = tuned
    lora = str(out / "lora.pt")
    fails_with_one_line(capsys, export, ["--checkpoint_path", checkpoint, "--lora_path", lora, "--peft_adapter",
                                         "--output_path", str(tmp_path / "a")], "adapts another base model")
    folder = run_export("--checkpoint_path", base, "--output_path", str(tmp_path / "base"))
    os.remove(os.path.join(folder, "modeling_lightgpt.py"))
    fails_with_one_line(capsys, export, ["--checkpoint_path", folder, "--lora_path", lora, "--peft_adapter",
                                         "--output_path", str(tmp_path / "b")], "has no modeling_lightgpt.py")
    assert not os.path.exists(tmp_path / "a") and not os.path.exists(tmp_path / "b")
