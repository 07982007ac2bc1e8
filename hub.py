"""LightGPT on the HuggingFace Hub: the exported-folder format and everything that talks to the Hub.

An exported folder (export.py, GPT.save_pretrained) holds model.safetensors, the weights alone (safetensors:
a JSON header and raw tensor bytes, nothing to unpickle), config.json and a README.md model card, the Hub's
layout for a model. config.json has the GPTConfig fields at its top level (as huggingface_hub's
PyTorchModelHubMixin writes a config), the sha256 of model.safetensors (sha256sum's, and the Hub's LFS hash)
and the records inference and evaluation read. A folder loads as a checkpoint state (load_exported), checked
as checkpoints are. huggingface_hub and safetensors are imported only where used: training and decoding need
neither. Hub ids, downloads (from the cache when offline), uploads, and whether the Hub answers at all
(hub_reachable: seconds, not minutes of retries) are here too; data.py asks them for hub datasets.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
from dataclasses import fields

from checkpoint import MODEL_ENTRIES, _is, _shown, checkpoint_problem, model_from_checkpoint
from common import UserError, first_line
from files import current_umask, file_sha256, os_reason
from model import GPT, GPTConfig
from sampling import Sampling

REPOSITORY = "LightGPT"  # how the card names the code that loads the model
ONNX_FILE = "model.onnx"  # export.py --onnx writes it beside the weights; the card describes it
ENCODING_NAMES = {"rope": "RoPE", "alibi": "ALiBi", "learned": "learned absolute"}  # the card's words for the switch

# ----------------------------------------------------------------------------- the Hub


HUB_TIMEOUT = 3.0  # seconds the hub gets to answer before a download is given up


def hub_reachable(endpoint: str, timeout: float) -> bool:
    """Whether the hub answers at all (any HTTP status) within `timeout` seconds, through the proxies the
    environment names. In a thread, so a slow name lookup is cut off too."""
    import threading
    import urllib.error
    import urllib.request

    answered = []

    def probe():
        try:
            urllib.request.urlopen(urllib.request.Request(endpoint, method="HEAD"), timeout=timeout).close()
            answered.append(True)
        except urllib.error.HTTPError:  # an answer, even if not a welcome one
            answered.append(True)
        except (OSError, ValueError):  # no route, refused, timed out, or no URL at all
            pass

    thread = threading.Thread(target=probe, daemon=True)
    thread.start()
    thread.join(timeout)
    return bool(answered)


def hub_offline(names: tuple[str, ...] = ("HF_HUB_OFFLINE", "HF_DATASETS_OFFLINE")) -> str | None:
    """The variable that puts HuggingFace in offline mode, if one does (its truthy spellings); models
    (export.py, exported folders) heed HF_HUB_OFFLINE alone."""
    for name in names:
        if os.environ.get(name, "").upper() in ("1", "ON", "YES", "TRUE"):
            return name
    return None


def hub_endpoint() -> str:
    return os.environ.get("HF_ENDPOINT", "https://huggingface.co").rstrip("/")


def is_hub_id(name: str) -> bool:
    """Whether a --checkpoint_path that names no local file could be a HuggingFace Hub model id (owner/name)."""
    if name.count("/") != 1 or name.endswith(".pt") or name.startswith((".", "~")):
        return False
    try:
        from huggingface_hub.utils import HFValidationError, validate_repo_id
    except ImportError:  # no hub library (training and decoding need none): a local path then
        return False
    try:
        validate_repo_id(name)
    except HFValidationError:
        return False
    return True


def is_exported(path: str) -> bool:
    """Whether --checkpoint_path names an exported folder (or its hub id) rather than a checkpoint file."""
    return os.path.isdir(path) or (not os.path.exists(path) and is_hub_id(path))


def hub_download(repo_id: str, flag: str, revision: str | None = None) -> str:
    """The local folder of a hub model's config.json and model.safetensors: from the HuggingFace cache
    when offline or when the hub cannot be reached, else downloaded (and cached)."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import RepositoryNotFoundError, RevisionNotFoundError

    files = dict(repo_id=repo_id, allow_patterns=[CONFIG_FILE, WEIGHTS_FILE], revision=revision)
    offline = hub_offline(("HF_HUB_OFFLINE",))
    endpoint = hub_endpoint()
    if offline is None and not hub_reachable(endpoint, HUB_TIMEOUT):  # seconds, not minutes of retries
        offline = f"{endpoint} cannot be reached"
    try:
        folder = snapshot_download(**files, local_files_only=offline is not None)
        # Said, so that a mistyped local folder of the shape owner/name never loads a hub model silently.
        print(f"{flag}: no local file or folder {repo_id}: the HuggingFace Hub model {repo_id} "
              f"({'from the cache' if offline else 'downloaded or cached'})", file=sys.stderr, flush=True)
        return folder
    except RepositoryNotFoundError:
        raise UserError(f"{flag}: no local file or folder {repo_id}, and no model {repo_id} on the HuggingFace Hub "
                        f"(a private or gated one needs a login: hf auth login, or HF_TOKEN)") from None
    except RevisionNotFoundError:
        raise UserError(f"{flag}: {repo_id} has no revision {revision} on the HuggingFace Hub") from None
    except Exception as e:
        if offline is not None:
            why = f"{offline} is set" if offline.startswith("HF_") else offline
            raise UserError(f"{flag}: no network: cannot download {repo_id} from the HuggingFace Hub ({why}), the "
                            f"HuggingFace cache has no copy and no local file or folder has that name; pass an exported "
                            f"folder, or connect and retry") from None
        raise UserError(f"{flag}: cannot download {repo_id} from the HuggingFace Hub ({first_line(e)})") from None


def push_folder(folder: str, repo: str, private: bool) -> str:
    """Upload the folder as one commit to a hub model repository (created if missing); one line on failure."""
    from huggingface_hub import HfApi
    from huggingface_hub.errors import HfHubHTTPError, LocalTokenNotFoundError

    later = f"{folder} is written; upload it later with: hf upload {repo} {folder} ."
    offline = hub_offline(("HF_HUB_OFFLINE",))
    endpoint = hub_endpoint()
    if offline is not None or not hub_reachable(endpoint, HUB_TIMEOUT):
        why = f"{offline} is set" if offline else f"{endpoint} cannot be reached"
        raise UserError(f"--push_to_hub: no network: cannot upload to the HuggingFace Hub ({why}); {later}")
    try:
        api = HfApi()
        api.create_repo(repo, private=private, exist_ok=True)
        commit = api.upload_folder(repo_id=repo, folder_path=folder, repo_type="model",
                                   commit_message=f"Upload {os.path.basename(folder)} from LightGPT's export.py")
    except LocalTokenNotFoundError:
        raise UserError(f"--push_to_hub: not logged in to the HuggingFace Hub (hf auth login, or HF_TOKEN); {later}") from None
    except (HfHubHTTPError, OSError) as e:
        raise UserError(f"--push_to_hub: cannot upload to {repo} ({first_line(e)}); {later}") from None
    return getattr(commit, "commit_url", None) or f"{endpoint}/{repo}"


# ----------------------------------------------------------------------------- exported folders

EXPORT_FORMAT = 1
WEIGHTS_FILE, CONFIG_FILE, CARD_FILE = "model.safetensors", "config.json", "README.md"
GENERATION_FILE = "generation_config.json"  # transformers' generate() defaults, beside the modeling file
MODELING_FILE = "modeling_lightgpt.py"  # copied into every export: transformers' remote code for the model
MODELING_SOURCE = os.path.join(os.path.dirname(os.path.abspath(__file__)), MODELING_FILE)
MODELING_ENCODINGS = ("none", "rope", "alibi", "learned")  # the position encodings modeling_lightgpt.py computes
EXPORT_KEYS = ("lightgpt_format", "weights_sha256")  # config.json's own entries, besides the architecture and records


def special_token_ids(model: GPT) -> dict:
    """bos/eos/pad ids under transformers' names: end-of-text begins and ends a text; a chat model ends an
    answer with <|im_end|> and pads with <|pad|>, its last two ids (chat.ChatTokenizer's layout)."""
    eot, V = model.export_info.get("eot_id"), model.config.vocabulary_size
    if model.export_info.get("special_tokens"):
        return {"bos_token_id": eot, "eos_token_id": V - 2, "pad_token_id": V - 1}
    return {"bos_token_id": eot, "eos_token_id": eot, "pad_token_id": None}


def transformers_fields(model: GPT) -> dict:
    """config.json's fields under transformers' names (and, where modeling_lightgpt.py covers the model's
    position encoding, the model type and auto_map that AutoModelForCausalLM with trust_remote_code reads)."""
    c = model.config
    fields = {"vocab_size": c.vocabulary_size, "hidden_size": c.embedding_dimensions,
              "num_attention_heads": c.num_attention_heads, "num_hidden_layers": c.num_hidden_layers,
              **special_token_ids(model),
              "torch_dtype": str(model.token_embeddings.weight.dtype).removeprefix("torch."),
              "tie_word_embeddings": True}
    if c.position_encoding in MODELING_ENCODINGS:
        module = os.path.splitext(MODELING_FILE)[0]
        fields.update(model_type="lightgpt", architectures=["LightGPTForCausalLM"],
                      auto_map={"AutoConfig": f"{module}.LightGPTConfig",
                                "AutoModelForCausalLM": f"{module}.LightGPTForCausalLM"})
    return fields


def generation_config(model: GPT) -> dict:
    """generation_config.json: what transformers' generate() does by default with the export, generate.py's
    defaults (sampling at its temperature, top-k and top-p; end-of-text, and a chat model's <|im_end|>, end
    an answer)."""
    ids, eot, sampling = special_token_ids(model), model.export_info["eot_id"], Sampling()
    stops = [ids["eos_token_id"], eot] if ids["eos_token_id"] != eot else eot  # generate.py's: both, in a chat
    pad = eot if ids["pad_token_id"] is None else ids["pad_token_id"]
    return {"bos_token_id": eot, "eos_token_id": stops, "pad_token_id": pad, "do_sample": True,
            "temperature": sampling.temperature, "top_k": sampling.top_k, "top_p": sampling.top_p}


def save_exported(model: GPT, folder: str) -> None:
    """Write model.safetensors and config.json (the architecture, the weights' sha256, model.export_info)
    into an existing folder. The output layer is the embedding table (tied), so it is stored once."""
    from safetensors.torch import save_file

    weights = {name: t.detach().cpu().contiguous() for name, t in model.state_dict().items()}
    if any(name.endswith((".lora_a", ".lora_b", ".base.weight", "token_embeddings.new")) for name in weights):
        raise ValueError("an exported model holds plain weights: merge_lora(model) first")
    path = os.path.join(folder, WEIGHTS_FILE)
    save_file(weights, path, metadata={"format": "pt"})
    os.chmod(path, 0o666 & ~current_umask())  # safetensors makes it private (0600); a shared model is not
    config = {**model.config.to_dict(), "lightgpt_format": EXPORT_FORMAT, **model.export_info,
              "weights_sha256": file_sha256(path), **transformers_fields(model)}
    if model.config.position_encoding in MODELING_ENCODINGS:  # transformers' remote code: the same logits
        shutil.copyfile(MODELING_SOURCE, os.path.join(folder, MODELING_FILE))
        if "eot_id" in model.export_info:  # a bare model (no tokenizer recorded) has no end-of-text to stop at
            with open(os.path.join(folder, GENERATION_FILE), "w", encoding="utf-8") as f:
                json.dump(generation_config(model), f, indent=2)
                f.write("\n")
    with open(os.path.join(folder, CONFIG_FILE), "w", encoding="utf-8") as f:
        json.dump(config, f, indent=2)
        f.write("\n")


def load_exported(name: str, flag: str = "--checkpoint_path", required: tuple[str, ...] = MODEL_ENTRIES,
                  revision: str | None = None) -> dict:
    """An exported folder, or a hub id's (hub_download), as a state like load_checkpoint's: "config",
    "model" (the tensors), "token_encoding", "eot_id", "special_tokens" for a chat model, "args" (the
    training records evaluate.py reads), "sha256" (its identity: the checkpoint it was exported from,
    when no LoRA was merged in, so that the checkpoint's LoRA fits it too; else its weights' hash) and
    "export_info" (config.json's records). Checked as load_checkpoint checks: the weights' sha256, the
    safetensors file, the config, every weight's shape; any fault is one line naming the file."""
    config, weights = _read_folder(name, flag, revision)
    architecture = {f.name for f in fields(GPTConfig)}
    records = {k: v for k, v in config.items() if k not in architecture and k not in EXPORT_KEYS}
    state = {"kind": "pretrain", "config": {k: v for k, v in config.items() if k in architecture}, "model": weights}
    state.update({k: records[k] for k in ("token_encoding", "eot_id", "special_tokens") if k in records})
    problem = checkpoint_problem(state, ("config", "model", *required))
    for key in ("pretraining", "instruction_tuning"):
        if problem is None and not isinstance(records.get(key, {}), dict):
            problem = f"its {key!r} is {_shown(records[key])}, expected a dict"
    if problem:
        raise UserError(f"{flag}: {name} is not a usable exported model: {problem}")
    state["args"] = dict(records.get("pretraining", {}))  # what evaluate.py reads of a checkpoint's "args"
    tuning = records.get("instruction_tuning", {})
    if "max_tokens_per_sample" in tuning:
        state["args"]["max_tokens_per_sample"] = tuning["max_tokens_per_sample"]
    source = records.get("checkpoint_sha256")
    state["sha256"] = source if isinstance(source, str) and "lora_sha256" not in records else config["weights_sha256"]
    state["export_info"] = records
    return state


def _read_folder(name: str, flag: str, revision: str | None) -> tuple[dict, dict]:
    """An exported folder's config.json and weights, the weights checked against the sha256 it records."""
    if os.path.isdir(name):
        folder = name
    elif os.path.exists(name):
        raise UserError(f"{flag}: {name} is a file, not an exported folder")
    elif is_hub_id(name):
        folder = hub_download(name, flag, revision)
    else:
        raise UserError(f"{flag}: no exported folder at {name}")
    config_path, weights_path = os.path.join(name, CONFIG_FILE), os.path.join(name, WEIGHTS_FILE)
    for file in (CONFIG_FILE, WEIGHTS_FILE):
        if not os.path.isfile(os.path.join(folder, file)):
            raise UserError(f"{flag}: {name} has no {file}: an exported folder (export.py) holds {WEIGHTS_FILE} "
                            f"and {CONFIG_FILE}")
    try:
        with open(os.path.join(folder, CONFIG_FILE), encoding="utf-8") as f:
            config = json.load(f)
        weights_digest = file_sha256(os.path.join(folder, WEIGHTS_FILE))
    except OSError as e:
        raise UserError(f"{flag}: cannot read {name} ({os_reason(e)})") from None
    except (UnicodeDecodeError, json.JSONDecodeError) as e:
        raise UserError(f"{flag}: {config_path} is not valid JSON ({first_line(e)})") from None
    if not isinstance(config, dict) or "lightgpt_format" not in config:
        raise UserError(f"{flag}: {config_path} does not describe a LightGPT model (no 'lightgpt_format' entry)")
    version = config["lightgpt_format"]
    if not _is(version, int) or version < 1:
        raise UserError(f"{flag}: {config_path}: its 'lightgpt_format' {_shown(version)} is not a positive integer")
    if version > EXPORT_FORMAT:
        raise UserError(f"{flag}: {name} was exported by a newer LightGPT (format {version})")
    if not isinstance(config.get("weights_sha256"), str):
        raise UserError(f"{flag}: {config_path} has no 'weights_sha256' string to check {WEIGHTS_FILE} against")
    if weights_digest != config["weights_sha256"]:
        raise UserError(f"{flag}: {weights_path} is damaged: its sha256 is not the one {CONFIG_FILE} records (a "
                        f"changed or truncated file); export or download it again")
    check_tokenizer_file(folder, config, flag)
    from safetensors import SafetensorError
    from safetensors.torch import load_file

    try:
        return config, load_file(os.path.join(folder, WEIGHTS_FILE))
    except (SafetensorError, OSError, ValueError) as e:
        raise UserError(f"{flag}: {weights_path} is not a readable safetensors file ({first_line(e)})") from None


TOKENIZER_FILE = "tokenizer.json"  # hf_tokenizer.py's, for Hugging Face's tools


def check_tokenizer_file(folder: str, config: dict, flag: str) -> None:
    """An export's tokenizer.json, where there is one, gives the weights' ids: as many as the model has, and
    end-of-text at its id (a tokenizer copied in from another model would feed transformers other ids)."""
    path = os.path.join(folder, TOKENIZER_FILE)
    if not os.path.isfile(path):
        return
    try:
        with open(path, encoding="utf-8") as f:
            tokenizer = json.load(f)
        added = {t["content"]: t["id"] for t in tokenizer.get("added_tokens") or []}
        ids = [*tokenizer["model"]["vocab"].values(), *added.values()]
    except OSError as e:
        raise UserError(f"{flag}: cannot read {path} ({os_reason(e)})") from None
    except (ValueError, KeyError, TypeError, AttributeError):
        raise UserError(f"{flag}: {path} is not a tokenizer file (tokenizer.json with a vocabulary); export the "
                        f"model again") from None
    vocabulary, eot = config.get("vocabulary_size"), config.get("eot_id")
    if not ids or max(ids) + 1 != vocabulary or added.get("<|endoftext|>") != eot:
        raise UserError(f"{flag}: {path} does not match the weights: {max(ids, default=-1) + 1:,} ids, end-of-text "
                        f"{added.get('<|endoftext|>')} (the weights: {vocabulary:,} ids, end-of-text {eot}); export "
                        f"the model again")


def from_pretrained(name: str, revision: str | None = None) -> GPT:
    """The model of an exported folder or its HuggingFace Hub id (a cached one loads offline), in eval mode on
    the CPU with the weights as saved, its records in model.export_info; a damaged or foreign folder raises
    UserError, one line. (A function of this module, not a GPT method, so that model.py imports nothing.)"""
    state = load_exported(str(name), required=(), revision=revision)
    model = model_from_checkpoint(state)
    model.export_info = state["export_info"]
    return model.eval()


def save_pretrained(model: GPT, folder: str, where: str | None = None) -> None:
    """Write model.safetensors (the weights, the tied table once), config.json (the architecture, the weights'
    sha256 and model.export_info) and a README.md model card whose usage names `where` (the folder)."""
    folder = str(folder)
    os.makedirs(folder, exist_ok=True)
    save_exported(model, folder)
    with open(os.path.join(folder, CARD_FILE), "w", encoding="utf-8") as f:
        f.write(model_card(model, where=where or folder))


def push_to_hub(model: GPT, repo_id: str, private: bool = False, token: str | None = None,
                commit_message: str = "Upload LightGPT model") -> str:
    """Upload what save_pretrained writes to a HuggingFace Hub model repository (created if missing; the token
    from HF_TOKEN or `hf auth login` unless given) and return the commit's URL."""
    import tempfile

    from huggingface_hub import HfApi

    with tempfile.TemporaryDirectory() as folder:
        save_pretrained(model, folder, where=repo_id)
        api = HfApi(token=token)
        api.create_repo(repo_id, private=private, exist_ok=True)
        return str(api.upload_folder(repo_id=repo_id, folder_path=folder, repo_type="model",
                                     commit_message=commit_message))


# ----------------------------------------------------------------------------- the model card


def hub_dataset(dataset) -> str | None:
    """A corpus the card can link: a hub dataset id, not the builtin corpus or a local file."""
    if not isinstance(dataset, str) or dataset == "builtin" or os.path.exists(dataset) or not is_hub_id(dataset):
        return None
    return dataset


def corpus_words(record: dict) -> str:
    dataset, subset = record.get("dataset"), record.get("dataset_subset")
    if dataset == "builtin":
        return "LightGPT's builtin offline data (made from CPython's `pydoc_data` documentation)"
    return f"`{dataset}`" + (f" ({subset})" if subset else "")


ENGLISH_CORPORA = ("builtin", "HuggingFaceFW/fineweb", "HuggingFaceFW/fineweb-edu", "HuggingFaceTB/smoltalk")


def card_data(model: GPT):
    """The card's front matter: licence, corpora, language (where every corpus is a known English one),
    library (transformers where the export carries the modeling file), task, tags, and for a tuned model
    its base on the Hub (base_model, base_model_relation: finetune, the LoRA being merged in)."""
    from huggingface_hub import ModelCardData

    info, c = model.export_info, model.config
    pretraining, tuning = info.get("pretraining") or {}, info.get("instruction_tuning") or {}
    used = [d.get("dataset") for d in (pretraining, tuning) if d.get("dataset")]
    datasets = [d for d in map(hub_dataset, used) if d]
    position = {"none": "nope", "rope": "rope", "alibi": "alibi", "learned": "learned-positions"}[c.position_encoding]
    tags = ["lightgpt", position, "causal-lm", "safetensors"]
    tags += ["chat", "lora"] if info.get("special_tokens") else []
    tags += ["onnx"] if info.get("onnx") else []
    base = info.get("base_model")
    return ModelCardData(license=info.get("license", "apache-2.0"),
                         library_name="transformers" if c.position_encoding in MODELING_ENCODINGS else "pytorch",
                         pipeline_tag="text-generation", tags=tags, datasets=datasets or None,
                         language=["en"] if used and all(d in ENGLISH_CORPORA for d in used) else None,
                         base_model=base, base_model_relation="finetune" if base else None)


def card_usage(model: GPT, where: str, chat: bool) -> list[str]:
    """The card's usage section: transformers (where the export carries the modeling file), then LightGPT."""
    prompt = "What is a list comprehension?" if chat else "The meaning of life is"
    lines = ["## Usage", ""]
    if model.config.position_encoding in MODELING_ENCODINGS:
        start = ('tokenizer.apply_chat_template([{"role": "user", "content": ' + repr(prompt) + '}], '
                 'add_generation_prompt=True, return_dict=True, return_tensors="pt").input_ids' if chat else
                 f'tokenizer(tokenizer.bos_token + {prompt!r}, return_tensors="pt").input_ids')
        lines += ["With transformers (the modeling code is in this repository: `trust_remote_code=True`):", "",
                  "```python", "from transformers import AutoModelForCausalLM, AutoTokenizer", "",
                  f"model = AutoModelForCausalLM.from_pretrained({where!r}, trust_remote_code=True)",
                  f"tokenizer = AutoTokenizer.from_pretrained({where!r}, trust_remote_code=True)",
                  f"ids = {start}",
                  "print(tokenizer.decode(model.generate(ids, max_new_tokens=64)[0]))", "```", "",
                  "A LoRA trained on this model with LightGPT's instruction-tune.py loads with peft on top of it "
                  "(`PeftModel.from_pretrained`; its adapter folder's card shows how).", ""]
    lines += [f"In a clone of {REPOSITORY} (`pip install -r requirements.txt`):", "", "```python",
              "import torch", "from hub import from_pretrained", "", f"model = from_pretrained({where!r})  # eval mode, CPU",
              "logits = model(torch.tensor([[0, 1, 2]]))  # (batch, tokens, vocabulary)", "```", "", "```",
              f"python generate.py --checkpoint_path {where} --device cpu --prompt {prompt!r}", "```", ""]
    if chat:
        lines += ["Each prompt is a user turn; the answer is the assistant's and ends at `<|im_end|>`.", ""]
    return lines


def model_card(model: GPT, where: str = "FOLDER", **_) -> str:
    """README.md: HuggingFace front matter (card_data), what the model is, its shape and training, the
    files and how to load it. `where` is the folder or hub id the usage names."""
    info, c = model.export_info, model.config
    pretraining, tuning = info.get("pretraining") or {}, info.get("instruction_tuning") or {}
    data = card_data(model)
    chat = bool(info.get("special_tokens"))
    design = ("no positional embeddings (NoPE): causal attention alone tells positions apart, so no weight depends "
              "on a context length" if c.position_encoding == "none"
              else f"{ENCODING_NAMES[c.position_encoding]} position encoding (LightGPT's ablation switch; its default "
                   f"is NoPE)")
    lines = [f"---\n{data.to_yaml()}\n---", "", f"# {os.path.basename(where.rstrip('/')) or where}", "",
             f"A {'chat ' if chat else ''}language model trained with {REPOSITORY}: a decoder-only Transformer with "
             f"{design}; pre-norm RMSNorm, a SiLU MLP, no biases, and token embeddings tied to the output layer "
             f"(stored once).", "",
             "| vocabulary | width | heads | layers | MLP ratio | position encoding | parameters | training context |",
             "|---|---|---|---|---|---|---|---|",
             f"| {c.vocabulary_size:,} | {c.embedding_dimensions} | {c.num_attention_heads} | {c.num_hidden_layers} | "
             f"{c.feed_forward_ratio} | {c.position_encoding} | {model.num_parameters():,} | "
             f"{info.get('training_context_length', 'not recorded')} |", ""]
    encoding = info.get("token_encoding")
    tokenizer = "bytes (one id per byte)" if encoding == "bytes" else f"tiktoken's `{encoding}`"
    lines.append(f"- Tokenizer: {tokenizer if encoding else 'not recorded'}, end-of-text id "
                 f"{info.get('eot_id', 'not recorded')}.")
    if pretraining:
        lines.append(f"- Pretraining: {corpus_words(pretraining)}, samples of {pretraining.get('tokens_per_sample')} tokens.")
    if tuning:
        lora = tuning.get("lora")
        how = f"LoRA (rank {lora['rank']}, alpha {lora['alpha']:g}) merged into the weights" if lora else "LoRA, merged"
        lines.append(f"- Instruction tuning: {corpus_words(tuning)}, rows of {tuning.get('max_tokens_per_sample')} "
                     f"tokens, {how}; ChatML special tokens {', '.join(f'`{t}`' for t in info['special_tokens'])}"
                     + (f"; base model [`{info['base_model']}`](https://huggingface.co/{info['base_model']})."
                        if info.get("base_model") else "."))
    lines += ["", "Files: `model.safetensors` (the weights; `config.json` holds its sha256, checked at load), "
              "`config.json` (the architecture, tokenizer and training records)"
              + (f", `{MODELING_FILE}` and `generation_config.json` (transformers' code for the model and its "
                 f"generation defaults), `tokenizer.json` and `tokenizer_config.json` (the tokenizer for Hugging "
                 f"Face's tools{', with the chat template' if chat else ''})"
                 if c.position_encoding in MODELING_ENCODINGS else "")
              + (f", `{ONNX_FILE}` (see below)" if info.get("onnx") else "") + ".", ""]
    if info.get("onnx"):
        o = info["onnx"]
        lines += [f"`{ONNX_FILE}` is the prefill forward in fp32 (opset {o['opset']}): input `input_ids` "
                  f"(batch, sequence) int64, output `logits` (batch, sequence, {c.vocabulary_size}), both axes dynamic, "
                  f"no KV cache. Against PyTorch in onnxruntime its largest logit difference was {o['max_abs_diff']:.1e} "
                  f"at shapes {', '.join('x'.join(map(str, s)) for s in o['checked_shapes'])}.", ""]
    lines += card_usage(model, where, chat)
    return "\n".join(lines)
