"""export.py and exported folders: round trips to identical logits (plain, LoRA-merged, save_pretrained),
the scripts reading a folder as they read a checkpoint, damaged folders refused in one line, the hub
offline and monkeypatched, and the ONNX graph against PyTorch."""

import errno
import json
import os
import sys
from dataclasses import replace

import pytest
import torch
from conftest import fails_with_one_line
from helpers import NEW, TRAINING_LENGTH, perturb, tiny

import beam_search
import evaluate
import export
import generate
import hub
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from common import UserError
from generate import inference_model
from lora import LoRAConfig, add_lora, grow_vocabulary, lora_state_dict
from model import GPT

SPECIAL = ["<|im_start|>", "<|im_end|>", "<|pad|>"]
B = 257  # the byte tokenizer's ids: 256 bytes and end-of-text
FILES = ["README.md", "config.json", "generation_config.json", "model.safetensors", "modeling_lightgpt.py",
         "tokenizer.json", "tokenizer_config.json"]  # an export's
IDS = torch.tensor([[256, 84, 104, 101, 32], [256, 1, 2, 3, 4]])  # end-of-text first, as prompts start


def run_export(*argv) -> str:
    return export.main(export.parse_args(list(argv)))


def logits(model: GPT, ids=IDS) -> torch.Tensor:
    with torch.no_grad():
        return model.eval()(ids)


@pytest.fixture(scope="module")
def exported(checkpoint, tmp_path_factory):
    out = str(tmp_path_factory.mktemp("exports") / "tiny")
    run_export("--checkpoint_path", checkpoint, "--output_path", out)
    return out


def byte_model() -> GPT:
    """helpers.tiny()'s shape with the byte tokenizer's 257 ids (its 300 fit no tokenizer: see the last test)."""
    torch.manual_seed(0)
    return GPT(replace(tiny().config, vocabulary_size=B))


@pytest.fixture(scope="module")
def base_and_lora(tmp_path_factory):
    """A base checkpoint and trained-looking LoRA adapters for it, saved as instruction-tune.py saves them."""
    folder = tmp_path_factory.mktemp("lora")
    base_model, base_path, lora_path = byte_model(), str(folder / "base.pt"), str(folder / "lora.pt")
    save_checkpoint({"kind": "pretrain", "config": base_model.config.to_dict(), "model": base_model.state_dict(),
                     "token_encoding": "bytes", "eot_id": 256}, base_path)
    model = add_lora(grow_vocabulary(byte_model(), NEW), LoRAConfig(4, 2.0, 0.0), (B, NEW)).eval()
    perturb(model)
    save_checkpoint({"kind": "lora", "config": model.config.to_dict(), "adapters": lora_state_dict(model),
                     "lora": {"rank": 4, "alpha": 2.0, "dropout": 0.0},
                     "base": {"sha256": load_checkpoint(base_path, "pretrain")["sha256"], "vocabulary_size": B},
                     "special_tokens": SPECIAL, "token_encoding": "bytes", "eot_id": 256,
                     "args": {"dataset": "HuggingFaceTB/smoltalk", "max_tokens_per_sample": 48}}, lora_path)
    return base_path, lora_path


# ----------------------------------------------------------------------------- round trips


def test_export_then_from_pretrained_gives_identical_logits(checkpoint, exported):
    from safetensors import safe_open

    original = model_from_checkpoint(load_checkpoint(checkpoint, "pretrain"))
    loaded = hub.from_pretrained(exported)
    assert not loaded.training and torch.equal(logits(loaded), logits(original))
    assert sorted(os.listdir(exported)) == FILES
    with safe_open(os.path.join(exported, "model.safetensors"), "pt") as f:  # the tied table, once
        assert set(f.keys()) == set(original.state_dict())
        assert sum(k.startswith("token_embeddings") for k in f.keys()) == 1
    with open(os.path.join(exported, "config.json")) as f:
        config = json.load(f)
    assert {k: config[k] for k in original.config.to_dict()} == original.config.to_dict()
    assert config["token_encoding"] == "bytes" and config["eot_id"] == 256 and config["training_context_length"] == 32
    assert config["checkpoint_sha256"] == load_checkpoint(checkpoint, "pretrain")["sha256"]
    with open(os.path.join(exported, "README.md")) as f:
        card = f.read()
    front = card.split("---")[1]
    for line in ("license: apache-2.0", "library_name: transformers", "pipeline_tag: text-generation", "- nope",
                 "language:\n- en"):
        assert line in front, front
    assert "datasets" not in front and "base_model" not in front  # the builtin corpus is no hub dataset
    assert f"from_pretrained({exported!r})" in card and f"--checkpoint_path {exported}" in card
    assert f"AutoModelForCausalLM.from_pretrained({exported!r}, trust_remote_code=True)" in card


@pytest.mark.slow  # an export and three models' forwards: the slow tier (CI runs it)
def test_lora_merged_export_computes_what_base_plus_adapters_do(base_and_lora, tmp_path):
    base, lora = base_and_lora
    out = run_export("--checkpoint_path", base, "--lora_path", lora, "--output_path", str(tmp_path / "chat"),
                     "--base_model", "you/lightgpt-base")
    reference = inference_model(base, torch.device("cpu"), lora)[0]
    loaded = hub.from_pretrained(out)
    ids = torch.randint(0, B + NEW, (2, 12), generator=torch.Generator().manual_seed(0))
    assert torch.equal(logits(loaded, ids), logits(reference, ids))
    assert loaded.export_info["special_tokens"] == SPECIAL
    assert loaded.export_info["instruction_tuning"]["lora"] == {"rank": 4, "alpha": 2.0}
    with open(os.path.join(out, "README.md")) as f:
        card = f.read()
    front = card.split("---")[1]
    assert "- HuggingFaceTB/smoltalk" in front and "- chat" in front and "language:\n- en" in front
    assert "base_model: you/lightgpt-base" in front and "base_model_relation: finetune" in front
    # the card's transformers usage runs as written (fewer new tokens), the chat template included
    usage = card.split("```python\n")[1].split("```")[0].replace("max_new_tokens=64", "max_new_tokens=3")
    namespace = {}
    exec(usage, namespace)
    from chat import ChatTokenizer, render_prompt
    from data import load_encoding

    expected = render_prompt(ChatTokenizer(load_encoding("bytes")),
                             [{"role": "user", "content": "What is a list comprehension?"}])
    assert namespace["ids"].tolist() == [expected]


MIXED = "ASCII, accents (naïve café, Ærøskøbing), emoji 🙂🚀, code: def f(x):\n\treturn x ** 2  # ok\n" \
        "and a user typing <|im_end|> or <|endoftext|> as text\r\n  12345   end"


def test_the_exports_tokenizer_files_give_our_ids(exported, base_and_lora, tmp_path):
    """AutoTokenizer on an export: the ids of LightGPT's tokenizer for any text (special-token text typed
    in it read as text, split_special_tokens=True); for a chat model also the ChatML tokens at the model's
    ids and a chat template whose generation prompt is chat.render_prompt's ids."""
    from transformers import AutoTokenizer

    from chat import ChatTokenizer, render_prompt
    from data import load_encoding

    encoding = load_encoding("bytes")
    tokenizer = AutoTokenizer.from_pretrained(exported, trust_remote_code=True)  # config.json names remote code
    ids = tokenizer(MIXED, split_special_tokens=True)["input_ids"]
    assert ids == encoding.encode_ordinary(MIXED) and tokenizer.decode(ids) == MIXED
    assert tokenizer.eos_token_id == tokenizer.bos_token_id == 256
    base, lora = base_and_lora
    chat_folder = run_export("--checkpoint_path", base, "--lora_path", lora, "--output_path", str(tmp_path / "chat"))
    chat = AutoTokenizer.from_pretrained(chat_folder, trust_remote_code=True)
    ours = ChatTokenizer(encoding)
    assert [chat.convert_tokens_to_ids(t) for t in SPECIAL] == [ours.im_start, ours.im_end, ours.pad] == [B, B + 1, B + 2]
    assert chat.eos_token == "<|im_end|>" and chat.pad_token == "<|pad|>"
    messages = [{"role": "system", "content": "Answer briefly."}, {"role": "user", "content": "What is 2 + 2? ü 🙂"},
                {"role": "assistant", "content": "4."}, {"role": "user", "content": "And 3 + 3?"}]
    prompt = chat.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    prompt = prompt["input_ids"] if hasattr(prompt, "keys") else prompt
    assert list(prompt) == render_prompt(ours, messages)
    # a tool conversation renders as serve.py renders it (arguments as OpenAI's JSON text, or as a dict)
    import serve

    call = {"id": "c1", "type": "function", "function": {"name": "get_weather", "arguments": '{"city": "Oslo"}'}}
    tools = [*messages, {"role": "assistant", "content": None, "tool_calls": [call]},
             {"role": "tool", "tool_call_id": "c1", "content": "sunny"}]
    expected = render_prompt(ours, serve.chat_messages(serve.ChatBody(messages=tools)))
    as_dict = {**call, "function": {**call["function"], "arguments": {"city": "Oslo"}}}
    for calls in ([call], [as_dict]):
        tools[-2]["tool_calls"] = calls
        prompt = chat.apply_chat_template(tools, add_generation_prompt=True, tokenize=True)
        assert list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt) == expected
    parts = [{**m, "content": [{"type": "text", "text": m["content"][:3]}, {"type": "text", "text": m["content"][3:]}]}
             for m in messages]  # content as a list of text parts, as OpenAI's clients may send it
    prompt = chat.apply_chat_template(parts, add_generation_prompt=True, tokenize=True)
    assert list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt) == render_prompt(ours, messages)
    with pytest.raises(Exception, match="system, user, assistant and tool"):
        chat.apply_chat_template([{"role": "function", "content": "x"}], tokenize=False)
    with pytest.raises(Exception, match="only an assistant message makes tool calls"):  # as serve.py answers 400
        chat.apply_chat_template([{"role": "user", "content": "x", "tool_calls": [call]}], tokenize=False)


def bpe_file(path, text: str, merges: int) -> str:
    """A .tiktoken file (the 256 bytes, then `merges` byte-pair merges learned from `text`), so that a test
    exercises BPE merges and the split pattern offline (the named encodings are downloaded on first use)."""
    import base64

    import regex
    from tiktoken_ext.openai_public import r50k_pat_str  # the pattern data.py gives a .tiktoken file

    ranks = {bytes([i]): i for i in range(256)}
    words = [[bytes([b]) for b in piece.encode()] for piece in regex.findall(r50k_pat_str, text)]
    for _ in range(merges):
        pairs = {}
        for word in words:
            for pair in zip(word, word[1:]):
                pairs[pair] = pairs.get(pair, 0) + 1
        if not pairs:
            break
        left, right = max(pairs, key=pairs.get)
        ranks[left + right] = len(ranks)
        for i, word in enumerate(words):
            merged, j = [], 0
            while j < len(word):
                if j + 1 < len(word) and (word[j], word[j + 1]) == (left, right):
                    merged.append(left + right)
                    j += 2
                else:
                    merged.append(word[j])
                    j += 1
            words[i] = merged
    with open(path, "w") as f:
        f.writelines(f"{base64.b64encode(token).decode()} {rank}\n" for token, rank in ranks.items())
    return str(path)


def test_a_bpe_encoding_converts_to_the_same_ids(tmp_path):
    """A BPE with merges, as r50k/cl100k are (checked against them where tiktoken's cache holds them;
    the tests never download): the same ids on mixed text, end-of-text at its id, the chat template."""
    from chat import ChatTokenizer, render_prompt
    from data import load_encoding
    from hf_tokenizer import hf_tokenizer

    spec = bpe_file(tmp_path / "small.tiktoken", MIXED * 3 + " the then there these they hello help", 120)
    encoding = load_encoding(spec)
    assert encoding.n_vocab > 256 + 100 and len(encoding.encode_ordinary(MIXED)) < len(MIXED.encode()) / 2  # merges
    tokenizer = hf_tokenizer(spec)
    for text in (MIXED, "the thesis: there, then; hello?! " * 3, "   leading and trailing   ", ""):
        assert tokenizer(text, split_special_tokens=True)["input_ids"] == encoding.encode_ordinary(text)
    assert tokenizer.convert_tokens_to_ids("<|endoftext|>") == encoding.eot_token == encoding.n_vocab - 1
    chat, ours = hf_tokenizer(spec, chat=True), ChatTokenizer(encoding)
    messages = [{"role": "user", "content": "Hello there, how are they?"}, {"role": "assistant", "content": "Then fine."},
                {"role": "user", "content": "🙂 and the rest"}]
    prompt = chat.apply_chat_template(messages, add_generation_prompt=True, tokenize=True)
    assert list(prompt["input_ids"] if hasattr(prompt, "keys") else prompt) == render_prompt(ours, messages)


def test_without_transformers_the_export_has_no_tokenizer_files(checkpoint, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(export, "hf_available", lambda: False)
    out = run_export("--checkpoint_path", checkpoint, "--output_path", str(tmp_path / "plain"))
    assert sorted(os.listdir(out)) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                                       "modeling_lightgpt.py"]
    assert "pip install -r requirements-hf.txt" in capsys.readouterr().out


@pytest.mark.parametrize("position_encoding", ["none", "rope", "alibi", "learned", "chat"])
def test_transformers_loads_the_export_and_computes_our_logits(position_encoding, base_and_lora, tmp_path):
    """AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True) runs the exported
    modeling_lightgpt.py on model.safetensors as it is: the same logits (padded rows cut off), and greedy
    generate() through transformers' cache equals greedy decoding of our model, in eager and SDPA."""
    from transformers import AutoModelForCausalLM

    if position_encoding == "chat":
        path, lora = base_and_lora
    else:
        torch.manual_seed(0)
        model = GPT(replace(tiny().config, vocabulary_size=B, position_encoding=position_encoding))
        path, lora = str(tmp_path / "model.pt"), None
        save_checkpoint({"kind": "pretrain", "config": model.config.to_dict(), "model": model.state_dict(),
                         "token_encoding": "bytes", "eot_id": 256}, path)
    out = run_export("--checkpoint_path", path, *(["--lora_path", lora] if lora else []),
                     "--output_path", str(tmp_path / "hf"))
    ours = hub.from_pretrained(out).eval()
    V = ours.config.vocabulary_size
    ids = torch.randint(0, V, (2, 17), generator=torch.Generator().manual_seed(3))
    for attention in ("eager", "sdpa"):
        theirs = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True, attn_implementation=attention).eval()
        assert type(theirs).__name__ == "LightGPTForCausalLM" and theirs.config.vocab_size == V
        with torch.no_grad():
            assert (theirs(ids).logits - ours(ids)).abs().max() <= 1e-5
            generated = theirs.generate(ids[:1, :5], max_new_tokens=12, do_sample=False, eos_token_id=None,
                                        pad_token_id=0)
            expected = ids[:1, :5]
            for _ in range(12):
                expected = torch.cat([expected, ours(expected)[:, -1:].argmax(-1)], dim=1)
        assert torch.equal(generated, expected)
    # generate()'s defaults are generate.py's: sampling at its settings, stopping where it stops
    defaults = theirs.generation_config
    assert (defaults.do_sample, defaults.temperature, defaults.top_k, defaults.top_p) == (True, 1.0, 500, 0.9)
    stops = {256, V - 2} if position_encoding == "chat" else {256}
    assert set(defaults.eos_token_id if isinstance(defaults.eos_token_id, list) else [defaults.eos_token_id]) == stops


@pytest.mark.slow  # a fresh interpreter importing every script: seconds
def test_the_scripts_import_without_the_transformers_extra():
    """transformers, peft and lm-eval are optional extras: with them (and tokenizers) unimportable, every
    script still imports, and hf_tokenizer's check names the install in one line."""
    import subprocess

    code = ("import sys, importlib\n"
            "for extra in ('transformers', 'tokenizers', 'peft', 'lm_eval'):\n"
            "    sys.modules[extra] = None\n"
            "for name in ('pretrain', 'instruction-tune', 'generate', 'beam_search', 'evaluate', 'export', 'serve',\n"
            "             'bench', 'hub', 'hf_tokenizer', 'peft_adapter', 'harness'):\n"
            "    importlib.import_module(name)\n"
            "import hf_tokenizer\n"
            "hf_tokenizer.importlib.util.find_spec = lambda name: None\n"
            "try:\n    hf_tokenizer.require_transformers('x')\nexcept Exception as e:\n    print(e)\n")
    run = subprocess.run([sys.executable, "-c", code], cwd=os.path.dirname(os.path.dirname(os.path.abspath(__file__))),
                         capture_output=True, text=True, timeout=300)
    assert run.returncode == 0, run.stderr[-2000:]
    assert "x needs transformers and tokenizers (an optional extra): pip install -r requirements-hf.txt" in run.stdout


def test_save_pretrained_round_trip_keeps_the_records(tiny_model, exported, tmp_path):
    hub.save_pretrained(tiny_model, tmp_path / "plain")
    assert torch.equal(logits(hub.from_pretrained(tmp_path / "plain"), IDS % 300), logits(tiny_model, IDS % 300))
    with pytest.raises(UserError, match="no 'token_encoding'"):  # a bare model: the scripts need its tokenizer
        inference_model(str(tmp_path / "plain"), torch.device("cpu"))
    loaded = hub.from_pretrained(exported)
    hub.save_pretrained(loaded, tmp_path / "again")
    again = hub.from_pretrained(tmp_path / "again")
    assert again.export_info == loaded.export_info and torch.equal(logits(again), logits(loaded))
    with open(tmp_path / "again" / "generation_config.json") as f:  # transformers' defaults: generate.py's
        assert json.load(f) == {"bos_token_id": 256, "eos_token_id": 256, "pad_token_id": 256, "do_sample": True,
                                "temperature": 1.0, "top_k": 500, "top_p": 0.9}
    assert "generation_config.json" not in os.listdir(tmp_path / "plain")


def test_push_to_hub_from_python_uploads_what_save_pretrained_writes(exported, monkeypatch):
    import huggingface_hub

    uploaded = {}

    class FakeApi:
        def __init__(self, token=None):
            pass

        def create_repo(self, repo_id, private, exist_ok):
            assert exist_ok and not private
            return type("Repo", (), {"repo_id": repo_id})()

        def upload_folder(self, repo_id, folder_path, **kw):
            for name in os.listdir(folder_path):
                with open(os.path.join(folder_path, name), "rb") as f:
                    uploaded[name] = f.read()

    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    hub.push_to_hub(hub.from_pretrained(exported), "someone/tiny")
    assert sorted(uploaded) == ["README.md", "config.json", "generation_config.json", "model.safetensors",
                               "modeling_lightgpt.py"]
    assert b"from_pretrained('someone/tiny')" in uploaded["README.md"]
    with open(os.path.join(exported, "model.safetensors"), "rb") as f:
        assert uploaded["model.safetensors"] == f.read()


# ----------------------------------------------------------------------------- the scripts


def test_scripts_take_the_folder_as_they_take_the_checkpoint(checkpoint, exported, builtin_data, tmp_path,
                                                              capsys):
    def gen(path):
        return generate.main(generate.parse_args(["--checkpoint_path", path, "--device", "cpu", "--prompt", "The ",
                                                  "--max_tokens", "30", "--seed", "3"]))

    assert gen(exported) == gen(checkpoint)
    beams = [beam_search.main(beam_search.parse_args(["--checkpoint_path", path, "--device", "cpu", "--prompt", "a",
                                                      "--max_tokens", "4", "--beam_width", "2",
                                                      "--num_candidates", "2"]))[0]
             for path in (exported, checkpoint)]
    assert [c.tokens for c in beams[0]] == [c.tokens for c in beams[1]]
    results = evaluate.main(evaluate.parse_args([  # its corpus and training length from the folder's records
        "--checkpoint_path", exported, "--device", "cpu", "--dataset_path", builtin_data, "--output_path",
        str(tmp_path / "eval"), "--windows", "2", "--multiples", "1"]))
    assert list(results) == [TRAINING_LENGTH]
    with open(tmp_path / "eval" / "results.json") as f:
        assert json.load(f)["dataset"] == "builtin"


def test_a_lora_fits_the_folder_exported_from_its_base(base_and_lora, tmp_path, capsys):
    base, lora = base_and_lora
    folder = run_export("--checkpoint_path", base, "--output_path", str(tmp_path / "base"))
    from_folder = inference_model(folder, torch.device("cpu"), lora)[0]
    ids = torch.randint(0, B + NEW, (1, 9), generator=torch.Generator().manual_seed(1))
    assert torch.equal(logits(from_folder, ids), logits(inference_model(base, torch.device("cpu"), lora)[0], ids))
    other = run_export("--checkpoint_path", base, "--lora_path", lora, "--output_path", str(tmp_path / "merged"))
    fails_with_one_line(capsys, generate, ["--checkpoint_path", other, "--lora_path", lora, "--device", "cpu",
                                           "--prompt", "x"], "already a merged chat model")
    # The base's folder with the LoRA merged on a second export: the same chat model as from the checkpoint.
    again = run_export("--checkpoint_path", folder, "--lora_path", lora, "--output_path", str(tmp_path / "again"))
    chat = hub.from_pretrained(again)
    assert torch.equal(logits(chat, ids), logits(hub.from_pretrained(other), ids))
    assert chat.export_info["special_tokens"] == SPECIAL and "lora_sha256" in chat.export_info
    assert chat.export_info["instruction_tuning"]["lora"] == {"rank": 4, "alpha": 2.0}
    fails_with_one_line(capsys, generate, ["--checkpoint_path", again, "--lora_path", lora, "--device", "cpu",
                                           "--prompt", "x"], "already a merged chat model")


def test_a_hub_id_loads_from_the_cache_and_offline_is_one_line(exported, monkeypatch, capsys):
    fails_with_one_line(capsys, generate, ["--checkpoint_path", "someone/lightgpt-tiny", "--device", "cpu",
                                           "--prompt", "x"],
                        "no network: cannot download someone/lightgpt-tiny from the HuggingFace Hub", "HF_HUB_OFFLINE")
    import huggingface_hub

    asked = []
    monkeypatch.setattr(huggingface_hub, "snapshot_download", lambda **kw: asked.append(kw) or exported)
    capsys.readouterr()
    model = hub.from_pretrained("someone/lightgpt-tiny")
    assert asked[0]["repo_id"] == "someone/lightgpt-tiny" and asked[0]["local_files_only"]
    assert "no local file or folder someone/lightgpt-tiny: the HuggingFace Hub model" in capsys.readouterr().err
    assert torch.equal(logits(model), logits(hub.from_pretrained(exported)))


# ----------------------------------------------------------------------------- damaged folders


def flip(path, offset):
    with open(path, "r+b") as f:
        f.seek(offset, os.SEEK_END if offset < 0 else os.SEEK_SET)
        byte = f.read(1)
        f.seek(-1, os.SEEK_CUR)
        f.write(bytes([byte[0] ^ 0x01]))


def rewrite_config(folder, **changes):
    path = os.path.join(folder, "config.json")
    with open(path) as f:
        config = json.load(f)
    config.update(changes)
    with open(path, "w") as f:
        json.dump({k: v for k, v in config.items() if v is not None}, f)


def truncate(path):
    os.truncate(path, os.path.getsize(path) // 2)


def rehashed(folder, change):
    """A damaged weights file whose new sha256 config.json records: the safetensors checks must catch it."""
    from files import file_sha256

    change(os.path.join(folder, "model.safetensors"))
    rewrite_config(folder, weights_sha256=file_sha256(os.path.join(folder, "model.safetensors")))


DAMAGE = {
    "truncated weights": (lambda d: truncate(os.path.join(d, "model.safetensors")), "model.safetensors is damaged"),
    "a flipped bit in a weight": (lambda d: flip(os.path.join(d, "model.safetensors"), -5), "is damaged"),
    "a flipped bit in the header": (lambda d: flip(os.path.join(d, "model.safetensors"), 12), "is damaged"),
    "truncated and rehashed": (lambda d: rehashed(d, truncate), "not a readable safetensors file"),
    "no weights": (lambda d: os.remove(os.path.join(d, "model.safetensors")), "has no model.safetensors"),
    "no config": (lambda d: os.remove(os.path.join(d, "config.json")), "has no config.json"),
    "config not JSON": (lambda d: open(os.path.join(d, "config.json"), "w").write('{"vocab'), "is not valid JSON"),
    "config of another program": (lambda d: rewrite_config(d, lightgpt_format=None), "not describe a LightGPT model"),
    "a newer format": (lambda d: rewrite_config(d, lightgpt_format=99), "newer LightGPT (format 99)"),
    "an invalid config": (lambda d: rewrite_config(d, num_attention_heads=5), "must be divisible"),
    "fewer layers than weights": (lambda d: rewrite_config(d, num_hidden_layers=1), "unexpected weight 'blocks.1."),
    "another width": (lambda d: rewrite_config(d, embedding_dimensions=64), "has shape"),
    "no tokenizer": (lambda d: rewrite_config(d, token_encoding=None), "no 'token_encoding'"),
    "another model's tokenizer.json": (lambda d: grow_tokenizer_file(d), "tokenizer.json does not match the weights"),
    "a tokenizer.json that is none": (lambda d: open(os.path.join(d, "tokenizer.json"), "w").write("[]"),
                                      "tokenizer.json is not a tokenizer file"),
}


def grow_tokenizer_file(folder):
    """tokenizer.json as another model's: a vocabulary one id longer than the weights'."""
    path = os.path.join(folder, "tokenizer.json")
    with open(path) as f:
        tokenizer = json.load(f)
    tokenizer["model"]["vocab"]["extra"] = B
    with open(path, "w") as f:
        json.dump(tokenizer, f)


@pytest.mark.parametrize("damage", DAMAGE)
def test_a_damaged_folder_is_one_line_naming_the_file(exported, damage, tmp_path, capsys):
    import shutil

    folder = str(tmp_path / "copy")
    shutil.copytree(exported, folder)
    change, fragment = DAMAGE[damage]
    change(folder)
    fails_with_one_line(capsys, generate, ["--checkpoint_path", folder, "--device", "cpu", "--prompt", "x"],
                        "--checkpoint_path", folder, fragment)


# ----------------------------------------------------------------------------- export.py's flags and folder


def test_export_flags_and_folders_are_one_line(checkpoint, exported, tmp_path, monkeypatch, capsys):
    out = str(tmp_path / "out")
    ok = ["--checkpoint_path", checkpoint, "--output_path", out]
    cases = [
        (["--onnx_opset", "17"], "--onnx_opset", "18 or above"),
        (["--private"], "--private", "--push_to_hub"),
        (["--push_to_hub", "a/b/c"], "--push_to_hub", "repository id"),
        (["--license", "MIT License"], "--license"),
        (["--output_path", exported], "not empty", "--overwrite"),
        (["--output_path", checkpoint], "--output_path", "is a file"),
        (["--checkpoint_path", str(tmp_path / "none.pt")], "--checkpoint_path", "no checkpoint at"),
        (["--output_path", os.path.dirname(checkpoint), "--overwrite"], "holds the --checkpoint_path",
         "would delete it"),
    ]
    for argv, *fragments in cases:
        fails_with_one_line(capsys, export, [*ok, *argv], *fragments)
    monkeypatch.setitem(sys.modules, "onnxruntime", None)  # as if not installed
    fails_with_one_line(capsys, export, [*ok, "--onnx"], "onnxruntime missing", "pip install -r requirements-onnx.txt")
    import safetensors.torch

    def full_disk(*a, **k):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(safetensors.torch, "save_file", full_disk)
    fails_with_one_line(capsys, export, ok, f"--output_path: cannot write {out} (no space left on device); nothing")
    assert os.listdir(tmp_path) == []
    monkeypatch.setattr(export, "save_pretrained", lambda *a, **k: 1 / 0)  # a failure mid-write leaves nothing behind
    with pytest.raises(ZeroDivisionError):
        run_export(*ok)
    assert os.listdir(tmp_path) == []


def test_overwrite_replaces_the_folder_whole(checkpoint, base_and_lora, tmp_path):
    out = run_export("--checkpoint_path", checkpoint, "--output_path", str(tmp_path / "m"))
    (tmp_path / "m" / "notes.txt").write_text("mine")
    run_export("--checkpoint_path", base_and_lora[0], "--output_path", out, "--overwrite")
    assert sorted(os.listdir(out)) == FILES
    assert hub.from_pretrained(out).config.vocabulary_size == B and os.listdir(tmp_path) == ["m"]
    assert export.parse_args(["--checkpoint_path", "runs/a.pt"]).output_path == os.path.join(".", "exports", "a")
    assert export.parse_args(["--lora_path", "c/chat.pt"]).output_path == os.path.join(".", "exports", "chat")


def test_push_to_hub_offline_is_one_line_and_online_uploads_the_folder(checkpoint, tmp_path, monkeypatch,
                                                                       capsys):
    out = str(tmp_path / "pushed")
    fails_with_one_line(capsys, export, ["--checkpoint_path", checkpoint, "--output_path", out, "--push_to_hub",
                                         "someone/tiny"], "--push_to_hub: no network", "HF_HUB_OFFLINE is set",
                        f"hf upload someone/tiny {out}")
    assert os.path.isfile(os.path.join(out, "model.safetensors"))  # written before the upload was tried
    import huggingface_hub

    calls = []

    class FakeApi:
        def create_repo(self, repo_id, private, exist_ok):
            calls.append(("create", repo_id, private))

        def upload_folder(self, repo_id, folder_path, **kw):
            calls.append(("upload", repo_id, sorted(os.listdir(folder_path))))

    monkeypatch.delenv("HF_HUB_OFFLINE")
    monkeypatch.setattr(hub, "hub_reachable", lambda endpoint, timeout: True)
    monkeypatch.setattr(huggingface_hub, "HfApi", FakeApi)
    run_export("--checkpoint_path", checkpoint, "--output_path", out, "--overwrite", "--push_to_hub",
               "someone/tiny", "--private")
    assert calls == [("create", "someone/tiny", True),
                     ("upload", "someone/tiny", FILES)]
    with open(os.path.join(out, "README.md")) as f:
        assert "from_pretrained('someone/tiny')" in f.read()


# ----------------------------------------------------------------------------- ONNX


@pytest.mark.slow  # torch's ONNX exporter: about 10 s
@pytest.mark.parametrize("position_encoding", ["none", "rope", "alibi"])
def test_onnx_graph_matches_pytorch(position_encoding, tmp_path, capsys):
    import numpy as np
    import onnxruntime

    torch.manual_seed(0)
    model = GPT(replace(tiny().config, position_encoding=position_encoding, vocabulary_size=B)).eval()
    path = str(tmp_path / "model.pt")
    save_checkpoint({"kind": "pretrain", "config": model.config.to_dict(), "model": model.state_dict(),
                     "token_encoding": "bytes", "eot_id": 256}, path)
    out = run_export("--checkpoint_path", path, "--output_path", str(tmp_path / "onnx"), "--onnx")
    assert "model.onnx: largest |onnxruntime - PyTorch| logit difference" in capsys.readouterr().out
    with open(os.path.join(out, "config.json")) as f:
        assert json.load(f)["onnx"]["max_abs_diff"] <= 1e-4
    session = onnxruntime.InferenceSession(os.path.join(out, "model.onnx"), providers=["CPUExecutionProvider"])
    ids = torch.randint(0, B, (2, 70), generator=torch.Generator().manual_seed(5))
    got = session.run(["logits"], {"input_ids": ids.numpy()})[0]
    assert np.abs(got - logits(model, ids).numpy()).max() <= 1e-4


def test_a_model_whose_vocabulary_is_not_its_tokenizers_is_one_line(tmp_path, capsys):
    """A checkpoint or folder whose model has more ids than its tokenizer decodes (a hand-edited config.json,
    say) would sample ids the tokenizer cannot print: refused before any decoding, and not exported (its
    tokenizer files would not fit the weights)."""
    model, base = tiny(), str(tmp_path / "mismatched.pt")  # a 300-id model recorded with the 257-id byte tokenizer
    save_checkpoint({"kind": "pretrain", "config": model.config.to_dict(), "model": model.state_dict(),
                     "token_encoding": "bytes", "eot_id": 256}, base)
    message = "the model has a vocabulary of 300 ids but its tokenizer (bytes) has 257"
    fails_with_one_line(capsys, generate, ["--checkpoint_path", base, "--device", "cpu", "--prompt", "x"], message)
    fails_with_one_line(capsys, export, ["--checkpoint_path", base, "--output_path", str(tmp_path / "out")], message)
    assert not os.path.exists(tmp_path / "out")
