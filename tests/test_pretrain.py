import glob
import os
import signal
import subprocess
import sys
import time

import pytest
import torch
from conftest import ROOT, fails_with_one_line, tiny_pretrain_args

import pretrain
from checkpoint import load_checkpoint
from common import run_main


def run(argv):
    return pretrain.main(pretrain.parse_args(argv))


def final_weights(path):
    return load_checkpoint(path, "pretrain")["model"]


def assert_same_weights(a, b):
    assert a.keys() == b.keys()
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-7, msg=name)


# ----------------------------------------------------------------------------- schedule


def test_learning_rate_schedule():
    lr = lambda step, schedule="cosine": pretrain.learning_rate_at(step, 100, 1.0, 10, schedule, 0.1)
    assert [lr(s) for s in range(3)] == pytest.approx([0.1, 0.2, 0.3])  # linear warmup
    assert lr(9) == pytest.approx(1.0) and lr(10) == pytest.approx(1.0)  # peak
    assert lr(99) == pytest.approx(0.1)  # decayed to min_lr_ratio at the last step
    assert lr(55) == pytest.approx(0.1 + 0.9 * 0.5, abs=1e-2)  # cosine midpoint
    decay = [lr(s) for s in range(10, 100)]
    assert all(a >= b for a, b in zip(decay, decay[1:]))
    assert lr(55, "linear") == pytest.approx(0.1 + 0.9 * (1 - 45 / 89))
    assert lr(80, "constant") == 1.0


# ----------------------------------------------------------------------------- training


def test_loss_falls_and_run_leaves_checkpoint_and_events(builtin_data, tmp_path):
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "20", "--eval_interval", "10",
                              "--gradient_accumulation_steps", "1", "--learning_rate", "3e-2")
    history = run(argv)
    assert [s for s, _ in history] == [0, 40, 80]  # before training, then every 10 epochs of 4 steps
    assert history[-1][1] < history[0][1] / 3
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")
    assert state["step"] == 80 and state["token_encoding"] == "bytes" and state["seed"] == 7
    assert state["config"]["embedding_dimensions"] == 32 and state["config"]["vocabulary_size"] == 257
    assert not any(k.startswith("_orig_mod") for k in state["model"])
    assert glob.glob(str(tmp_path / "runs" / "events.out.tfevents.*"))


@pytest.mark.slow  # two training runs (the interrupt test resumes exactly in the quick tier)
def test_resume_continues_exactly(builtin_data, tmp_path):
    common = ("--dropout", "0.1", "--lr_schedule", "constant")
    straight, split = tmp_path / "straight", tmp_path / "split"
    run(tiny_pretrain_args(builtin_data, str(straight), *common, "--num_epochs", "4"))
    run(tiny_pretrain_args(builtin_data, str(split), *common, "--num_epochs", "2"))
    run(tiny_pretrain_args(builtin_data, str(split), *common, "--num_epochs", "4", "--resume"))
    assert_same_weights(final_weights(straight / "checkpoint.pt"), final_weights(split / "checkpoint.pt"))
    resumed = load_checkpoint(str(split / "checkpoint.pt"), "pretrain")
    assert resumed["step"] == 8
    straight_opt = load_checkpoint(str(straight / "checkpoint.pt"), "pretrain")["optimizer"]["state"]
    for key, value in straight_opt[0].items():
        torch.testing.assert_close(resumed["optimizer"]["state"][0][key], value)


@pytest.mark.parametrize("curriculum", [(), pytest.param(("--short_tokens_per_sample", "16", "--short_fraction", "0.6"),
                                                         marks=pytest.mark.slow)])  # the curriculum's: slow tier
def test_interrupt_saves_a_checkpoint_that_resumes_exactly(builtin_data, tmp_path, monkeypatch, curriculum):
    """Also through a length curriculum whose switch (at step 5 of 8) comes after the stop (at step 4)."""
    straight, stopped = tmp_path / "straight", tmp_path / "stopped"
    run(tiny_pretrain_args(builtin_data, str(straight), "--dropout", "0.1", *curriculum))

    real = pretrain.learning_rate_at

    def signal_at_step_3(step, *args):
        if step == 3:  # mid-epoch: the run must finish this step, save and stop
            signal.raise_signal(signal.SIGTERM)
        return real(step, *args)

    monkeypatch.setattr(pretrain, "learning_rate_at", signal_at_step_3)
    with pytest.raises(SystemExit) as e:
        run_main(pretrain.main, pretrain.parse_args,
                 tiny_pretrain_args(builtin_data, str(stopped), "--dropout", "0.1", *curriculum))
    assert e.value.code == 128 + signal.SIGTERM
    assert load_checkpoint(str(stopped / "checkpoint.pt"), "pretrain")["step"] == 4
    monkeypatch.setattr(pretrain, "learning_rate_at", real)
    run(tiny_pretrain_args(builtin_data, str(stopped), "--dropout", "0.1", "--resume", *curriculum))
    assert_same_weights(final_weights(straight / "checkpoint.pt"), final_weights(stopped / "checkpoint.pt"))


# ----------------------------------------------------------------------------- errors


def fails_with(capsys, argv, *fragments):
    return fails_with_one_line(capsys, pretrain, argv, *fragments)


@pytest.mark.parametrize(
    "flag, value, fragment",
    [
        ("--batch_size", "0", "positive integer"),
        ("--gradient_accumulation_steps", "-3", "positive integer"),
        ("--tokens_per_sample", "ten", "positive integer"),
        ("--learning_rate", "nan", "finite number"),
        ("--learning_rate", "0", "positive number"),
        ("--dropout", "1.5", "[0, 1)"),
        ("--feed_forward_ratio", "3", "invalid choice"),
        ("--ddp_sharding_level", "1", "invalid choice"),
        ("--lr_schedule", "step", "invalid choice"),
        ("--compile", "maybe", "invalid choice"),
        ("--max_gradient_norm", "-1", "positive number"),
        ("--seed", "-5", "integer in [0, 2**63)"),
        ("--num_dataset_processes", "0", "positive integer"),
        ("--min_lr_ratio", "1", "[0, 1)"),
        ("--eval_samples", "0", "positive integer"),
        ("--rms_decay", "0.5", "number <= 0"),
        ("--momentum", "1", "[0, 1)"),
        ("--short_fraction", "-0.1", "[0, 1)"),
        ("--short_tokens_per_sample", "-1", "integer >= 0"),
        ("--init", "orthogonal", "invalid choice"),
        ("--start_token", "bos", "invalid choice"),
    ],
)
def test_bad_flag_values_are_one_line(capsys, tmp_path, flag, value, fragment):
    argv = tiny_pretrain_args(str(tmp_path), str(tmp_path))
    fails_with(capsys, argv + [flag, value], flag, fragment)


def test_user_errors_are_one_line(capsys, builtin_data, tmp_path):
    base = tiny_pretrain_args(builtin_data, str(tmp_path))
    fails_with(capsys, base + ["--num_attention_heads", "5"], "divisible by num_attention_heads")
    fails_with(capsys, base + ["--samples_per_epoch", "4"], "--samples_per_epoch 4")
    fails_with(capsys, base + ["--dataset", str(tmp_path / "missing.txt")], "no such file or folder")
    fails_with(capsys, base + ["--token_encoding", "nope"], "--token_encoding 'nope' is unknown")
    fails_with(capsys, base + ["--tokens_per_sample", "100000"], "--tokens_per_sample 100000")
    fails_with(capsys, base + ["--short_tokens_per_sample", "32"], "--short_tokens_per_sample 32")
    if not torch.cuda.is_available():
        fails_with(capsys, base + ["--device", "cuda"], "CUDA is not available")
    fails_with(capsys, base + ["--device", "tpu9"], "--device")


def test_checkpoint_errors_with_resume(capsys, builtin_data, tmp_path):
    base = tiny_pretrain_args(builtin_data, str(tmp_path))
    fails_with(capsys, base + ["--resume"], "no checkpoint at")
    checkpoint = tmp_path / "checkpoint.pt"
    checkpoint.write_bytes(b"this is not a checkpoint")
    fails_with(capsys, base + ["--resume"], "not a LightGPT checkpoint (not a PyTorch file)")
    fails_with(capsys, base, "exists; pass --resume")  # never overwritten by a fresh run
    assert checkpoint.read_bytes() == b"this is not a checkpoint"
    torch.save({"kind": "lora", "version": 1}, checkpoint)
    fails_with(capsys, base + ["--resume"], "'lora' checkpoint")
    torch.save({"weights": torch.zeros(2)}, checkpoint)
    fails_with(capsys, base + ["--resume"], "not a LightGPT checkpoint")


def test_resume_with_another_encoding_is_refused(capsys, builtin_data, tmp_path):
    run(tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "1"))
    fails_with(capsys, tiny_pretrain_args(builtin_data, str(tmp_path), "--resume", "--token_encoding", "r50k_base"),
               "differs from the checkpoint")


@pytest.mark.slow  # script processes
def test_command_line_error_has_no_traceback(tmp_path):
    result = subprocess.run(
        [sys.executable, "pretrain.py", "--dataset", str(tmp_path / "nothing.jsonl"), "--device", "cpu",
         "--token_encoding", "bytes", "--dataset_path", str(tmp_path)],
        cwd=ROOT, capture_output=True, text=True, timeout=120,
    )
    assert result.returncode == 2
    assert result.stderr.strip() == f"error: --dataset: no such file or folder: {tmp_path / 'nothing.jsonl'}"
    assert "Traceback" not in result.stdout + result.stderr


def test_unreachable_tokenizer_stops_pretraining_with_one_line(offline_tiktoken, capsys, tmp_path):
    argv = tiny_pretrain_args(str(tmp_path), str(tmp_path))
    argv[argv.index("--token_encoding") + 1] = "r50k_base"
    fails_with(capsys, argv, "cannot load the tiktoken encoding 'r50k_base'", "TIKTOKEN_CACHE_DIR",
               "--token_encoding bytes")
    assert not os.path.exists(tmp_path / "checkpoint.pt")


def test_a_hub_dataset_offline_is_one_line(capsys, tmp_path):
    """Not eleven lines of huggingface_hub retries first (conftest sets HF_HUB_OFFLINE=1)."""
    argv = tiny_pretrain_args(str(tmp_path), str(tmp_path))
    argv[argv.index("--dataset") + 1] = "someone/corpus"
    fails_with(capsys, argv, "someone/corpus", "HF_HUB_OFFLINE", "--dataset builtin", "local file")


# ----------------------------------------------------------------------------- stopping before the first step


@pytest.fixture
def sigterm_guard():
    """Until pretrain handles SIGTERM itself, one would kill the test process without a word; this fails the
    test instead. pretrain's own handler replaces it while the run lasts."""
    def handler(signum, frame):
        pytest.fail("SIGTERM reached no handler of pretrain's: the run would have died silently")

    previous = signal.signal(signal.SIGTERM, handler)
    yield
    signal.signal(signal.SIGTERM, previous)


def stops_with(capsys, argv, exit_code) -> str:
    """Run pretrain as the command line would; it must exit with exit_code and one line on stderr."""
    with pytest.raises(SystemExit) as e:
        run_main(pretrain.main, pretrain.parse_args, argv)
    assert e.value.code == exit_code
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1, err
    return err


def files_under(path):
    return sorted(os.path.relpath(os.path.join(root, f), path) for root, _, names in os.walk(path) for f in names)


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_during_the_first_evaluation_saves_nothing_and_says_so(builtin_data, tmp_path, monkeypatch, capsys,
                                                                    sigterm_guard, sig):
    real = pretrain.eval_batches

    def signal_mid_evaluation(*args):
        for i, batch in enumerate(real(*args)):
            if i == 1:
                signal.raise_signal(sig)
            yield batch

    monkeypatch.setattr(pretrain, "eval_batches", signal_mid_evaluation)
    err = stops_with(capsys, tiny_pretrain_args(builtin_data, str(tmp_path)), 128 + sig)
    assert err == f"stopped by {signal.Signals(sig).name} before the first step; nothing was saved"
    assert not os.path.exists(tmp_path / "checkpoint.pt")
    assert not [f for f in files_under(tmp_path) if f.endswith(".tmp")]


@pytest.mark.parametrize("sig", [signal.SIGINT, signal.SIGTERM], ids=["SIGINT", "SIGTERM"])
def test_stop_while_tokenizing_leaves_no_token_files_and_says_so(tmp_path, monkeypatch, capsys, sigterm_guard, sig):
    import data

    def signal_after_a_batch(documents):
        yield documents[:10]
        signal.raise_signal(sig)
        yield documents[10:]

    monkeypatch.setattr(data, "_batched", signal_after_a_batch)
    tokens = tmp_path / "tokens"
    err = stops_with(capsys, tiny_pretrain_args(str(tokens), str(tmp_path)), 128 + sig)
    assert err == f"stopped by {signal.Signals(sig).name} while tokenizing; the token files were not written"
    assert files_under(tmp_path) == []  # no token files, no metadata, no temporary files, no checkpoint


# ----------------------------------------------------------------------------- resume


@pytest.mark.parametrize("step, where", [(0, "start of epoch 1"), (1, "epoch 1, 1 of 64 steps done"),
                                         (64, "end of epoch 1"), (65, "epoch 2, 1 of 64 steps done"),
                                         (77, "epoch 2, 13 of 64 steps done"), (128, "end of epoch 2")])
def test_epoch_position_matches_the_per_epoch_log(step, where):
    """The per-epoch log prints "epoch k/N" after step k x steps_per_epoch: that step ends epoch k."""
    assert pretrain.epoch_position(step, 64) == where


def test_resume_names_the_epoch_its_step_is_in(builtin_data, tmp_path, monkeypatch, capsys):
    real = pretrain.learning_rate_at

    def signal_at_step_2(step, *args):
        if step == 2:  # the first step of epoch 2 (2 steps per epoch): the checkpoint holds step 3
            signal.raise_signal(signal.SIGTERM)
        return real(step, *args)

    monkeypatch.setattr(pretrain, "learning_rate_at", signal_at_step_2)
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "2")
    with pytest.raises(SystemExit):
        run_main(pretrain.main, pretrain.parse_args, argv)
    monkeypatch.setattr(pretrain, "learning_rate_at", real)
    capsys.readouterr()
    run(argv + ["--resume"])
    out = capsys.readouterr().out
    assert f"resumed {tmp_path / 'checkpoint.pt'} at step 3 (epoch 2, 1 of 2 steps done)" in out
    assert "epoch 2/2:" in out



# ----------------------------------------------------------------------------- sizes the machine cannot hold


@pytest.mark.parametrize("flag, value", [("--embedding_dimensions", "1000000"), ("--num_hidden_layers", "10000000")])
def test_a_model_the_machine_cannot_hold_is_refused_before_it_is_built(capsys, builtin_data, tmp_path, monkeypatch,
                                                                        flag, value):
    """Terabytes of weights: one line naming the size flags, at once, without trying to allocate them (which
    fails with a traceback, or on Linux may succeed lazily and be OOM-killed later)."""
    def build(config):
        pytest.fail(f"the model was built ({flag} {value})")

    monkeypatch.setattr(pretrain, "GPT", build)
    started = time.monotonic()
    err = fails_with(capsys, tiny_pretrain_args(builtin_data, str(tmp_path), flag, value), f"{flag} {value}",
                     "--embedding_dimensions", "--num_hidden_layers", "--feed_forward_ratio", "--token_encoding",
                     "GiB, more than")
    assert time.monotonic() - started < 10
    assert err.startswith("error: ") and files_under(tmp_path) == []


@pytest.mark.parametrize("error", [
    torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB. GPU 0 has a total capacity of 139.81 GiB"),
    RuntimeError("[enforce fail at alloc_cpu.cpp:117] data. DefaultCPUAllocator: can't allocate memory: you tried "
                 "to allocate 103079215104 bytes. Error code 12 (Cannot allocate memory)"),
], ids=["cuda", "cpu"])
def test_running_out_of_memory_in_the_first_step_is_one_line(capsys, builtin_data, tmp_path, monkeypatch, error):
    """Activations too big for the device: one line naming the flags that size them, nothing saved."""
    from model import GPT

    real = GPT.forward

    def forward(self, *args, **kwargs):
        if self.training and torch.is_grad_enabled():  # the first evaluation passes; the first step does not
            raise error
        return real(self, *args, **kwargs)

    monkeypatch.setattr(GPT, "forward", forward)
    err = fails_with(capsys, tiny_pretrain_args(builtin_data, str(tmp_path)), "out of memory", "step 1",
                     "--batch_size", "--tokens_per_sample", "--activation_checkpointing")
    assert "Traceback" not in err and not os.path.exists(tmp_path / "checkpoint.pt")
    assert not [f for f in files_under(tmp_path) if f.endswith(".tmp")]
