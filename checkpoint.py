"""LightGPT checkpoints: one torch.save file per run, read back with weights_only=True.

- Kinds: "pretrain" (a model, and for a run in progress its optimizer, sampler and RNG state; a merged chat
  model is one too, with its special tokens) and "lora" (instruction-tune.py: the adapters and new rows, the
  LoRAConfig, the base they adapt named by its sha256). The builders below are the one place each kind's
  entries are listed.
- Format: a dict with "version" and "sha256" (of its contents, in a fixed order) besides the entries;
  written to a temporary file, synced and renamed (files.atomic_path), so an interrupted save leaves the
  last checkpoint whole; a flipped bit or an edit is refused at load.
- Schema: CHECKPOINT_ENTRIES, checked by load_checkpoint against the config's shapes, every fault one line.
- One run per checkpoint: CheckpointLock.
"""

from __future__ import annotations

import hashlib
import os
import pickle
import warnings
from dataclasses import fields

import torch

from common import UserError, is_main_process, print0
from files import FileLock, atomic_path, os_reason
from lora import LoRAConfig, add_lora, lora_state_dict, trainable_by_kind
from model import GPT, GPTConfig

CHECKPOINT_VERSION = 1


class CheckpointLock(FileLock):
    """One run per checkpoint: an exclusive FileLock on `<checkpoint>.lock`, beside it, held for the life of
    a run, so that a second run stops at once and says who has it (the holder's pid, host and start). A
    context manager, or acquire() and release()."""

    def __init__(self, path: str, flag: str = "--checkpoint_path"):
        super().__init__(path + ".lock")
        self.checkpoint, self.flag = path, flag

    def acquire(self) -> None:
        def in_use(holder: str) -> None:
            holder = holder or "a process that is starting"
            raise UserError(f"{self.flag}: {self.checkpoint} is in use by another run ({holder}); wait for it to end, "
                            f"or choose another {self.flag}")

        try:
            locked = super().acquire(exclusive=True, when_held=in_use)
        except OSError as e:
            raise UserError(f"{self.flag}: cannot create the lock file {self.path} ({os_reason(e)})") from None
        if not locked:  # a file system without locks: go on unguarded, and say so
            print0(f"warning: cannot lock {self.path}; nothing stops a second run from writing {self.checkpoint} "
                   f"at the same time")

    def __enter__(self) -> "CheckpointLock":
        self.acquire()
        return self

    def __exit__(self, *exc) -> None:
        self.release()


def state_digest(state: dict) -> str:
    """sha256 of a checkpoint's contents in a fixed order: every entry's key, every tensor's dtype, shape
    and bytes, every other value's type and repr. Stored at save and checked at load, so that a flipped
    bit (torch.load reads one without a word, and a resumed run would then overwrite the file) or an edit
    is refused. torch's zip records carry CRC32s too, but torch.load does not check them and
    torch.serialization.set_crc32_options(False) writes none."""
    h = hashlib.sha256()

    def visit(value) -> None:
        if isinstance(value, torch.Tensor):
            t = value.detach().cpu().contiguous()
            h.update(f"tensor {t.dtype} {tuple(t.shape)}:".encode())
            h.update(t.reshape(-1).view(torch.uint8).numpy())
        elif isinstance(value, dict):
            h.update(f"dict {len(value)}:".encode())
            for key in sorted(value, key=repr):
                h.update(f"{key!r}=".encode())
                visit(value[key])
        elif isinstance(value, (list, tuple)):
            h.update(f"{type(value).__name__} {len(value)}:".encode())
            for item in value:
                visit(item)
        else:
            h.update(f"{type(value).__name__} {value!r};".encode())

    visit(state)
    return h.hexdigest()


class _RecordingWriter:
    """The file torch.save writes through, keeping the OSError of a failed write: torch reports one only as
    "unexpected pos 704 vs 598", and its cause (a full disk, a quota) is what the user needs to hear."""

    def __init__(self):
        self.file, self.error = None, None

    def write(self, data) -> int:
        try:
            return self.file.write(data)
        except OSError as e:
            self.error = e
            raise

    def flush(self) -> None:
        try:
            self.file.flush()
        except OSError as e:
            self.error = e
            raise


def save_checkpoint(state: dict, path: str, flag: str = "--checkpoint_path") -> None:
    """Write a checkpoint with the sha256 of its contents (rank 0 only): to a temporary file, synced and
    renamed, so an interrupted save never corrupts the last one. A failed write (a full disk) is one line."""
    if not is_main_process():
        return
    state = {"version": CHECKPOINT_VERSION, **state}
    state["sha256"] = state_digest(state)
    writer = _RecordingWriter()
    try:
        with atomic_path(path) as tmp, open(tmp, "wb") as writer.file:
            torch.save(state, writer)
    except (OSError, RuntimeError) as e:
        error = writer.error or e
        if not isinstance(error, OSError):
            raise  # not the disk: a bug, which deserves its traceback
        step = f" step {state['step']:,}" if isinstance(state.get("step"), int) else ""
        kept = "the checkpoint already there is intact" if os.path.exists(path) else "no checkpoint was written"
        raise UserError(f"{flag}: cannot save{step} to {path} ({os_reason(error)}); {kept}") from None


def unloadable_reason(path: str, error: Exception) -> str:
    """Why torch.load could not read `path`, in a few words of our own. A PyTorch file is a zip archive
    whose first entry is <name>/data.pkl (that local header survives when the file is cut short), or in
    the legacy format a pickle, which starts with its protocol opcode."""
    with open(path, "rb") as f:
        head = f.read(256)
    if not head:
        return "an empty file"
    if head.startswith(b"PK\x03\x04"):
        name_length = int.from_bytes(head[26:28], "little")
        if not head[30 : 30 + name_length].endswith(b"data.pkl"):
            return "a zip archive, not a PyTorch file"
    elif not head.startswith(b"\x80"):
        return "not a PyTorch file"
    if isinstance(error, pickle.UnpicklingError) and "weights only" in str(error).lower():
        return "it holds Python objects other than tensors and plain data"
    return "a truncated or damaged PyTorch file"


def _sampler_ok(value) -> bool:
    """A token file's or chat rows' sampler (a generator state and the samples drawn), or a streamed run's
    list of every rank's stream state (streaming.StreamSampler: an anchor and the batches drawn since)."""
    if isinstance(value, dict):
        return isinstance(value.get("generator"), torch.Tensor) and isinstance(value.get("samples_drawn"), int)
    return bool(value) and all(isinstance(s, dict) and isinstance(s.get("anchor"), dict)
                               and isinstance(s.get("skip"), int) for s in value)


# The checkpoint's schema: what each entry holds, as (type, check or None, the words for both). A script
# names the entries it needs (required=); whatever is present is checked.
CHECKPOINT_ENTRIES = {
    "kind": (str, None, "a string"),
    "config": (dict, None, "a dict of GPTConfig fields"),
    "model": (dict, None, "a dict of weights"),
    "token_encoding": (str, None, "a string"),
    "eot_id": (int, lambda v: v >= 0, "an integer >= 0"),
    "optimizer": (dict, None, "torch.optim's state dict"),
    "step": (int, lambda v: v >= 0, "an integer >= 0"),
    "steps_per_epoch": (int, lambda v: v >= 1, "a positive integer"),
    "sampler": ((dict, list), lambda v: _sampler_ok(v),
                "a dict with a generator state and samples_drawn, or a list of stream states, one per process"),
    "rng": (list, lambda v: v and all(isinstance(r, dict) and isinstance(r.get("torch"), torch.Tensor) for r in v),
            "a list of RNG states, one per process"),
    "seed": (int, lambda v: 0 <= v < 2**63, "an integer in [0, 2**63)"),
    "world_size": (int, lambda v: v >= 1, "a positive integer"),
    "dataset": (str, None, "a string"),
    "args": (dict, None, "a dict of flags"),
    # LoRA checkpoints (instruction-tune.py): the trained weights only, and the base they adapt
    "adapters": (dict, None, "a dict of adapter weights"),
    "lora": (dict, lambda v: _is(v.get("rank"), int) and v["rank"] >= 1 and _is(v.get("alpha"), float)
             and _is(v.get("dropout"), float) and 0 <= v["dropout"] < 1,
             "a dict of rank (>= 1), alpha and dropout (in [0, 1))"),
    "base": (dict, lambda v: isinstance(v.get("sha256"), str) and _is(v.get("vocabulary_size"), int),
             "a dict of the base checkpoint's sha256 and vocabulary_size"),
    # chat models (LoRA checkpoints and merged ones): the ChatML special tokens after the base vocabulary
    "special_tokens": (list, lambda v: v and all(isinstance(t, str) for t in v), "a list of token strings"),
    # a sharded checkpoint's pointer (sharded_checkpoint.py): its weights and optimizer state are in a folder
    "sharded": (dict, lambda v: isinstance(v.get("folder"), str) and isinstance(v.get("files"), dict)
                and _is(v.get("world_size"), int), "a dict of the shards' folder, files and world size"),
    "optimizer_groups": (list, None, "a list of the optimizer's settings"),
}  # and "version" and "sha256", checked by load_checkpoint before the rest
MODEL_ENTRIES = ("config", "model", "token_encoding", "eot_id")  # enough to generate
TRAINING_ENTRIES = ("optimizer", "step", "sampler", "rng", "seed")
RESUME_ENTRIES = (*MODEL_ENTRIES, *TRAINING_ENTRIES)  # enough to continue training
SHARDED_RESUME_ENTRIES = ("config", "token_encoding", "eot_id", "sharded", "step", "sampler", "rng", "seed")
LORA_ENTRIES = ("config", "adapters", "lora", "base", "special_tokens", "token_encoding", "eot_id")  # enough to chat


def _shown(value) -> str:
    if isinstance(value, (str, int, float, bool, type(None))):
        text = repr(value)
        return text if len(text) <= 40 else text[:36] + " ..."
    return f"a {type(value).__name__}" if not isinstance(value, (list, dict)) or value else repr(value)


def _is(value, kind) -> bool:
    if kind is int:
        return isinstance(value, int) and not isinstance(value, bool)
    if kind is float:
        return isinstance(value, (int, float)) and not isinstance(value, bool)
    return isinstance(value, kind)


# GPTConfig fields older checkpoints lack; they mean the default
LATER_CONFIG_FIELDS = ("position_encoding", "max_position_embeddings")


def checkpoint_problem(state: dict, required: tuple[str, ...] = ()) -> str | None:
    """What is wrong with a loaded LightGPT checkpoint (kind and version already checked), in words that
    follow "its file is not usable: ", or None. The one place the checkpoint's schema is checked."""
    for key in required:
        if key not in state:
            if key in ("model", "optimizer") and isinstance(state.get("sharded"), dict):
                return (f"it is a sharded checkpoint (its weights are in the folder {state['sharded'].get('folder')} "
                        f"beside it); make one file of it first: python consolidate.py --checkpoint_path <it> "
                        f"--output_path <new file>")
            return f"it has no {key!r} entry"
    for key, (kind, check, words) in CHECKPOINT_ENTRIES.items():
        if key in state and not (_is(state[key], kind) and (check is None or check(state[key]))):
            return f"its {key!r} is {_shown(state[key])}, expected {words}"
    if "config" not in state:
        return None
    config = state["config"]
    for f in fields(GPTConfig):
        if f.name not in config:
            if f.name in LATER_CONFIG_FIELDS:
                continue  # a checkpoint from before the field: from_dict takes its default
            return f"its config has no {f.name!r}"
        kind = type(f.default)
        if not _is(config[f.name], kind):
            words = {int: "an integer", float: "a number", str: "a string", bool: "true or false"}[kind]
            return f"its config's {f.name!r} is {_shown(config[f.name])}, expected {words}"
    try:
        config = GPTConfig.from_dict(config)
    except ValueError as e:
        return f"its config is invalid ({e})"
    if "eot_id" in state and state["eot_id"] >= config.vocabulary_size:
        return f"its 'eot_id' {state['eot_id']} is not in its vocabulary of {config.vocabulary_size}"
    with torch.device("meta"):  # shapes without memory, whatever the model's size
        model = GPT(config)
    if "model" in state:
        weights, expected = state["model"], model.state_dict()
        for name, like in expected.items():
            if name not in weights:
                return f"weight {name!r} is missing"
            w = weights[name]
            if not isinstance(w, torch.Tensor) or not w.is_floating_point():
                return f"weight {name!r} is {_shown(w) if not isinstance(w, torch.Tensor) else w.dtype}, " \
                       f"expected floating-point numbers"
            if w.shape != like.shape:
                return f"weight {name!r} has shape {tuple(w.shape)}; its config needs {tuple(like.shape)}"
        for name in weights:
            if name not in expected:
                return f"unexpected weight {name!r}"
    if "special_tokens" in state and "base" in state:
        expected = state["base"]["vocabulary_size"] + len(state["special_tokens"])
        if config.vocabulary_size != expected:
            return (f"its vocabulary of {config.vocabulary_size} is not the base's {state['base']['vocabulary_size']} "
                    f"plus its {len(state['special_tokens'])} special tokens")
    if "adapters" in state:
        return _adapters_problem(state, model)
    if "optimizer" in state:
        return _optimizer_problem(state["optimizer"], list(model.parameters()))
    return None


def _adapters_problem(state: dict, model: GPT) -> str | None:
    """A LoRA checkpoint's adapters and optimizer state against the adapted model's trainable weights."""
    if "lora" not in state or "base" not in state or "special_tokens" not in state:
        return "it has adapters but not the 'lora', 'base' and 'special_tokens' entries that describe them"
    lora = state["lora"]
    try:
        settings = LoRAConfig.from_dict(lora)
    except (ValueError, TypeError) as e:  # e.g. targets that are no projection of a block
        return f"its 'lora' settings are invalid ({e})"
    add_lora(model, settings, (state["base"]["vocabulary_size"], len(state["special_tokens"])))
    expected = lora_state_dict(model)
    for name, like in expected.items():
        w = state["adapters"].get(name)
        if not isinstance(w, torch.Tensor) or not w.is_floating_point() or w.shape != like.shape:
            found = "missing" if w is None else f"{tuple(w.shape)}" if isinstance(w, torch.Tensor) else _shown(w)
            return f"adapter weight {name!r} is {found}; rank {lora['rank']} needs {tuple(like.shape)}"
    for name in state["adapters"]:
        if name not in expected:
            return f"unexpected adapter weight {name!r}"
    if "optimizer" in state:
        return _optimizer_problem(state["optimizer"], sum(trainable_by_kind(model).values(), []))
    return None


def _optimizer_problem(optimizer: dict, params: list) -> str | None:
    """Adafactor's state in torch.optim.Adafactor's format against the parameters, in the optimizer's order."""
    state, groups = optimizer.get("state"), optimizer.get("param_groups")
    if not isinstance(state, dict) or not isinstance(groups, list) or not all(isinstance(g, dict) for g in groups):
        return "its optimizer state is not in torch.optim's format (a dict of 'state' and 'param_groups')"
    covered = sum(len(g.get("params", ())) for g in groups)
    if covered != len(params):
        return f"its optimizer state covers {covered} parameters; its model has {len(params)}"
    for index, entry in state.items():
        if not _is(index, int) or not 0 <= index < len(params) or not isinstance(entry, dict):
            return f"its optimizer state names a parameter {_shown(index)} of {len(params)}"
        shape = tuple(params[index].shape)
        expected = {"row_var": (*shape[:-1], 1), "col_var": (*shape[:-2], 1, *shape[-1:]), "variance": shape}
        for key, value in entry.items():
            if key in expected and (not isinstance(value, torch.Tensor) or tuple(value.shape) != expected[key]):
                found = tuple(value.shape) if isinstance(value, torch.Tensor) else _shown(value)
                return f"optimizer state {key!r} of parameter {index} has shape {found}; expected {expected[key]}"
    return None


def load_checkpoint(path: str, kind: str, flag: str = "--checkpoint_path", required: tuple[str, ...] = ()) -> dict:
    """Load a checkpoint onto the CPU (weights only) and check it: a LightGPT checkpoint of `kind`, whole
    (its sha256, where it has one: checkpoints from before checksums load unverified), holding the
    `required` entries, every entry well-formed, weights and optimizer state of its config's shapes."""
    if not os.path.exists(path):
        raise UserError(f"{flag}: no checkpoint at {path}")
    if os.path.isdir(path):
        raise UserError(f"{flag}: {path} is a directory, not a checkpoint file")
    try:
        with warnings.catch_warnings():  # torch warns about some pickles on stderr, under the one-line error
            warnings.simplefilter("ignore")
            state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as e:  # torch raises many types, with messages pages long, for a foreign or cut file
        raise UserError(f"{flag}: {path} is not a LightGPT checkpoint ({unloadable_reason(path, e)})") from None
    if not isinstance(state, dict) or "kind" not in state or "version" not in state:
        raise UserError(f"{flag}: {path} is not a LightGPT checkpoint (it loads, but LightGPT did not write it)")
    if state["kind"] != kind:
        raise UserError(f"{flag}: {path} is a {state['kind']!r} checkpoint, expected a {kind!r} checkpoint")
    version = state["version"]
    if not _is(version, int) or version < 1:
        raise UserError(f"{flag}: {path} is not a usable {kind} checkpoint: its format version {_shown(version)} "
                        f"is not a positive integer")
    if version > CHECKPOINT_VERSION:
        raise UserError(f"{flag}: {path} was written by a newer LightGPT (format {version})")
    digest = state.pop("sha256", None)
    if digest is not None and digest != state_digest(state):
        raise UserError(f"{flag}: {path} is damaged: its contents do not match the checksum saved with them (a "
                        f"changed bit on the disk or in a copy); use another copy")
    problem = checkpoint_problem(state, required)
    if problem:
        raise UserError(f"{flag}: {path} is not a usable {kind} checkpoint: {problem}")
    state["sha256"] = digest or state_digest(state)  # its identity: a LoRA checkpoint names its base by it
    return state


def require_entries(state: dict, required: tuple[str, ...], path: str, kind: str, flag: str = "--checkpoint_path") -> None:
    """One line if a loaded checkpoint lacks what the caller needs (load_checkpoint checked the rest)."""
    problem = checkpoint_problem(state, required)
    if problem:
        raise UserError(f"{flag}: {path} is not a usable {kind} checkpoint: {problem}")


def model_from_checkpoint(state: dict) -> GPT:
    """The model a checkpoint holds, on the CPU, from a state load_checkpoint has checked."""
    model = GPT(GPTConfig.from_dict(state["config"]))
    model.load_state_dict(state["model"])
    return model


def check_base(lora: dict, lora_path: str, base: dict, base_path: str, base_flag: str) -> None:
    """A LoRA checkpoint only fits the exact base it was trained on: the same weights, named by the
    base checkpoint's content hash."""
    if lora["base"]["sha256"] != base["sha256"]:
        raise UserError(f"{lora_path} adapts another base model than {base_flag} {base_path} (sha256 "
                        f"{lora['base']['sha256'][:12]}..., this one {base['sha256'][:12]}...); pass the base "
                        f"checkpoint it was trained on")


def rng_state() -> dict:
    """This process's RNG state: the CPU generator and its own GPU's (not every visible GPU's, so a
    checkpoint resumes on machines with another number of GPUs)."""
    state = {"torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state()
    return state


def set_rng_state(state: dict) -> None:
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state(state["cuda"])


# ----------------------------------------------------------------------------- the kinds, built
# The one place each kind's entries are listed; the scripts gather the values (a collective under FSDP).


def model_checkpoint(config: GPTConfig, weights: dict, token_encoding: str, eot_id: int, args: dict,
                     special_tokens: list[str] | None = None, **training) -> dict:
    """A "pretrain" checkpoint: a model that generates (MODEL_ENTRIES: the config rebuilds it with no flags),
    a merged chat model's special tokens, and for a run in progress its `training` entries (optimizer,
    step, sampler, rng, seed, world_size, dataset). `args` are the flags, for the record."""
    state = {"kind": "pretrain", "config": config.to_dict(), "model": weights, "token_encoding": token_encoding,
             "eot_id": eot_id}
    if special_tokens:
        state["special_tokens"] = list(special_tokens)
    return _with_entries(state, training, args)


def lora_checkpoint(config: GPTConfig, adapters: dict, lora: LoRAConfig, special_tokens: list[str], base: dict,
                    base_path: str, args: dict, **training) -> dict:
    """A "lora" checkpoint: the adapters and new token rows alone (LORA_ENTRIES), the grown config, and of the
    frozen base only its identity (sha256, vocabulary, where it was), plus the run's `training` entries."""
    state = {"kind": "lora", "config": config.to_dict(), "adapters": adapters, "lora": lora.to_dict(),
             "special_tokens": list(special_tokens),
             "base": {"sha256": base["sha256"], "vocabulary_size": base["config"]["vocabulary_size"],
                      "path": os.path.abspath(base_path)},
             "token_encoding": base["token_encoding"], "eot_id": base["eot_id"]}
    return _with_entries(state, training, args)


def _with_entries(state: dict, training: dict, args: dict) -> dict:
    unknown = set(training) - set(CHECKPOINT_ENTRIES)
    if unknown:
        raise ValueError(f"not checkpoint entries: {sorted(unknown)}")
    return {**state, **training, "args": args}
