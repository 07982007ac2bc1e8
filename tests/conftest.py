"""Shared fixtures: tiny seeded models and corpora, all offline and on the CPU."""

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

import pytest  # noqa: E402
import torch  # noqa: E402

torch.set_num_threads(1)

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
