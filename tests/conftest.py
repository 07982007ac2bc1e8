"""Shared fixtures: tiny seeded models and corpora, all offline and on the CPU."""

import importlib
import json
import os
import sys
import tempfile

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

# Keep HuggingFace caches inside the test session and never reach for the network.
_hf_home = tempfile.mkdtemp(prefix="lightgpt-hf-")
os.environ["HF_HOME"] = _hf_home
os.environ["HF_DATASETS_CACHE"] = os.path.join(_hf_home, "datasets")
os.environ["HF_HUB_OFFLINE"] = "1"
os.environ["HF_DATASETS_OFFLINE"] = "1"
# One thread, here and in the processes tests start: tiny models gain nothing from more, and on a
# busy 2-core machine OpenMP threads waiting for a core made a test 80 times slower (19.8 s, not 0.24 s).
os.environ["OMP_NUM_THREADS"] = "1"
# torch.compile's kernel cache (/tmp/torchinductor_<user>) does not tell kernels built for one
# ATEN_CPU_CAPABILITY from another's: reused under another, they failed to build (default) or decoded
# wrong tokens (avx2). A run that names a capability gets a cache of its own.
if os.environ.get("ATEN_CPU_CAPABILITY") and "TORCHINDUCTOR_CACHE_DIR" not in os.environ:
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = os.path.join(
        tempfile.gettempdir(), f"torchinductor-{os.getuid()}-{os.environ['ATEN_CPU_CAPABILITY']}")

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)
pytest.register_assert_rewrite("helpers")  # its asserts report as a test file's do

from model import GPT, GPTConfig  # noqa: E402

TINY = dict(vocabulary_size=300, embedding_dimensions=32, num_attention_heads=4, num_hidden_layers=2,
            feed_forward_ratio=4)


@pytest.fixture(autouse=True)
def offline_tiktoken(tmp_path_factory, monkeypatch):
    """Every test sees tiktoken as on a machine with no network where no named encoding was ever
    cached: an empty cache of its own, downloads that fail, and no encoding loaded earlier in this
    process. Local files still read. Tests about the offline error name it to say they rely on it."""
    import tiktoken.load
    import tiktoken.registry

    real_read_file = tiktoken.load.read_file

    def read_file(blobpath):
        if "://" in blobpath:
            raise ConnectionError(f"no network in the tests: {blobpath}")
        return real_read_file(blobpath)

    monkeypatch.setenv("TIKTOKEN_CACHE_DIR", str(tmp_path_factory.mktemp("tiktoken-cache")))  # subprocesses too
    monkeypatch.setattr(tiktoken.load, "read_file", read_file)
    monkeypatch.setattr(tiktoken.registry, "ENCODINGS", {})


@pytest.fixture(autouse=True)
def python_path_unless_asked(monkeypatch):
    """--cpu_kernels auto takes the compiled CPU kernels once this machine has built them: in tests the trainers
    take the Python path unless a test asks for the kernels (--cpu_kernels on, tests/test_cpu_kernels.py), so what
    a test exercises does not depend on this machine's build cache."""
    import cpu_kernels

    monkeypatch.setattr(cpu_kernels, "built", lambda: False)
    monkeypatch.setattr(cpu_kernels, "_loaded", None)


@pytest.fixture
def tiny_config():
    return GPTConfig(**TINY, dropout=0.0)


@pytest.fixture
def tiny_model(tiny_config):
    torch.manual_seed(0)
    return GPT(tiny_config)


@pytest.fixture(scope="session")
def builtin_data(tmp_path_factory):
    """Token files of the builtin corpus under the byte encoding, prepared once per session."""
    from data import prepare_token_files

    path = str(tmp_path_factory.mktemp("datasets"))
    prepare_token_files("builtin", None, "bytes", path, 2)
    return path


def tiny_pretrain_args(data_path, run_path, *extra):
    """Flags for a pretraining run of a few seconds on the builtin corpus."""
    return [
        "--dataset", "builtin", "--token_encoding", "bytes", "--dataset_path", data_path,
        "--device", "cpu", "--embedding_dimensions", "32", "--num_attention_heads", "4",
        "--num_hidden_layers", "2", "--batch_size", "4", "--gradient_accumulation_steps", "2",
        "--tokens_per_sample", "32", "--samples_per_epoch", "16", "--num_epochs", "4",
        "--eval_interval", "2", "--eval_samples", "16", "--checkpoint_interval", "2", "--warmup_steps", "2",
        "--checkpoint_path", os.path.join(run_path, "checkpoint.pt"),
        "--run_dir_path", os.path.join(run_path, "runs"), "--seed", "7", *extra,
    ]


WORDS = ["apple", "river", "stone", "cloud", "tiger", "lemon", "piano", "forest", "candle", "silver"]


def write_chats(path, n=80, system_every=4):
    """Conversations a tiny model learns in seconds: the answer depends only on whether a system
    message came first, a second turn gets an answer of its own, and no letter repeats among the
    answers (each next character follows from the last one)."""
    with open(path, "w") as f:
        for i in range(n):
            word = WORDS[i % len(WORDS)]
            system = i % system_every == 0
            messages = [{"role": "system", "content": "Be brief."}] if system else []
            messages += [{"role": "user", "content": f"Say {word}."},
                         {"role": "assistant", "content": "ok." if system else "yes."}]
            if i % 3 == 0:
                messages += [{"role": "user", "content": "Again."}, {"role": "assistant", "content": "hi!"}]
            f.write(json.dumps({"messages": messages}) + "\n")
    return str(path)


def tune_args(base, chats, out, *extra):
    return ["--base_model_path", base, "--dataset", chats, "--dataset_path", str(out / "datasets"),
            "--device", "cpu", "--max_tokens_per_sample", "128", "--batch_size", "4",
            "--gradient_accumulation_steps", "1", "--num_epochs", "6", "--learning_rate", "5e-2",
            "--warmup_steps", "2", "--rank", "4", "--alpha", "8", "--eval_samples", "8", "--mask_input",
            "--checkpoint_path", str(out / "lora.pt"), "--run_dir_path", str(out / "runs"), "--seed", "3",
            "--num_dataset_processes", "1", *extra]


@pytest.fixture(scope="session")
def base(builtin_data, tmp_path_factory):
    """A tiny pretrained model. Trained for seconds, its logits are nearly flat (small weights), and a
    frozen output layer could not become confident whatever the adapters do; a real base has the range.
    Its final norm's gain is raised to give it that range, as training longer would."""
    import pretrain
    from checkpoint import load_checkpoint, save_checkpoint

    run = tmp_path_factory.mktemp("base")
    pretrain.main(pretrain.parse_args(tiny_pretrain_args(builtin_data, str(run), "--num_epochs", "2")))
    state = load_checkpoint(str(run / "checkpoint.pt"), "pretrain")
    state.pop("sha256")
    state["model"]["output_norm.weight"] *= 8
    save_checkpoint(state, str(run / "base.pt"))
    return str(run / "base.pt")


@pytest.fixture(scope="session")
def chats(tmp_path_factory):
    return write_chats(tmp_path_factory.mktemp("chats") / "chats.jsonl")


@pytest.fixture(scope="session")
def tuned(base, chats, tmp_path_factory):
    """base instruction-tuned on chats with LoRA: (its folder, holding lora.pt and merged.pt; the history).
    Shared by the session: tests read it and write elsewhere."""
    tune = importlib.import_module("instruction-tune")
    out = tmp_path_factory.mktemp("tuned")
    history = tune.main(tune.parse_args(tune_args(base, chats, out, "--merge_path", str(out / "merged.pt"))))
    return out, history


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    """A tiny seeded byte-level model saved as pretrain.py saves one, with the records evaluate.py reads:
    its corpus and training length, helpers.TRAINING_LENGTH (training it would only slow the tests down).
    test_evaluate.py and test_export.py use it; test_generate.py has a `checkpoint` of its own."""
    from checkpoint import save_checkpoint
    from helpers import TRAINING_LENGTH

    torch.manual_seed(0)
    model = GPT(GPTConfig(**{**TINY, "vocabulary_size": 257}, dropout=0.0))
    path = str(tmp_path_factory.mktemp("eval") / "checkpoint.pt")
    save_checkpoint({"kind": "pretrain", "config": model.config.to_dict(), "model": model.state_dict(),
                     "token_encoding": "bytes", "eot_id": 256, "dataset": "builtin: CPython pydoc_data topics",
                     "args": {"dataset": "builtin", "dataset_subset": None, "token_encoding": "bytes",
                              "tokens_per_sample": TRAINING_LENGTH}}, path)
    return path


@pytest.fixture(scope="session")
def certain(tmp_path_factory):
    """A model whose answers are certain, for plumbing tests (tests/helpers.py): the paths of its base
    checkpoint (.base), its chat LoRA (.lora) and the two merged (.merged). The chat model answers
    helpers.CHAT_ANSWER then <|im_end|> to any prompt; the base model writes free letters, never ending."""
    from helpers import write_certain_model

    return write_certain_model(tmp_path_factory.mktemp("certain"))


def fails_with_one_line(capsys, module, argv, *fragments) -> str:
    """Run a script's main as the command line would; it must exit non-zero with one line on stderr
    that holds every fragment."""
    from common import run_main

    with pytest.raises(SystemExit) as e:
        run_main(module.main, module.parse_args, argv)
    assert e.value.code != 0
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    for fragment in fragments:
        assert fragment in err, err
    return err
