"""What a training run reports and records: a metrics line and TensorBoard points every --log_interval steps,
MFU where the device's peak is known, the run's settings as hparams and text, sampled texts at every
evaluation, the resolved config that --config repeats, and the guard against non-finite steps."""

import importlib
import os

import pytest
import torch
from conftest import fails_with_one_line, tiny_pretrain_args, tune_args
from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

import pretrain
import run_config
import training
from checkpoint import load_checkpoint, save_checkpoint
from parallel import Parallel

tune = importlib.import_module("instruction-tune")


def events(folder) -> EventAccumulator:
    accumulator = EventAccumulator(str(folder), size_guidance={"tensors": 0, "scalars": 0})
    accumulator.Reload()
    return accumulator


def steps(accumulator, tag) -> list[int]:
    return [event.step for event in accumulator.Scalars(tag)]


def texts(accumulator, tag) -> dict[int, str]:
    return {event.step: event.tensor_proto.string_val[0].decode() for event in accumulator.Tensors(tag)}


def test_metrics_every_log_interval_with_settings_and_samples(builtin_data, tmp_path, monkeypatch, capsys):
    args = pretrain.parse_args(tiny_pretrain_args(builtin_data, str(tmp_path), "--log_interval", "3",
                                                  "--peak_tflops", "0.5"))
    pretrain.main(args)  # 4 epochs of 2 steps: 8 steps, evaluations at 0, 4 and 8
    out = capsys.readouterr().out
    run = events(tmp_path / "runs")
    assert steps(run, "train/cross_entropy") == [3, 6, 8]  # every 3 steps, and the last
    for tag in ("learning_rate", "gradient_norm", "tokens_per_s", "mfu"):
        assert steps(run, f"train/{tag}") == [3, 6, 8], tag
    mfu = [event.value for event in run.Scalars("train/mfu")]
    tokens_per_s = [event.value for event in run.Scalars("train/tokens_per_s")]
    flops_per_token = load_model_flops(tmp_path / "checkpoint.pt", 32)
    for m, t in zip(mfu, tokens_per_s):  # one process: its FLOPs/s over the peak
        assert m == pytest.approx(t * flops_per_token / 0.5e12, rel=0.05)
    assert "step 3: loss " in out and "MFU " in out and "tokens/s" in out
    samples = texts(run, "samples/text_summary")
    assert sorted(samples) == [0, 4, 8]
    assert all(f"**{pretrain.SAMPLE_PROMPTS[0]}**" in text for text in samples.values())
    config = texts(run, "config/text_summary")[0]
    assert "learning_rate: 0.01" in config and "seed: 7" in config
    plugins = run.PluginTagToContent("hparams")
    assert plugins, "no hparams summary"


def test_on_the_cpu_mfu_is_against_its_measured_matrix_product_rate(builtin_data, tmp_path, monkeypatch):
    import metrics

    monkeypatch.setattr(metrics, "cpu_matmul_tflops", lambda: 0.25)
    pretrain.main(pretrain.parse_args(tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", "2")))
    run = events(tmp_path / "runs")
    (mfu,), (tokens_per_s,) = run.Scalars("train/mfu"), run.Scalars("train/tokens_per_s")
    flops_per_token = load_model_flops(tmp_path / "checkpoint.pt", 32)
    assert mfu.value == pytest.approx(tokens_per_s.value * flops_per_token / 0.25e12, rel=0.05)
    assert 0 < metrics.__dict__["cpu_matmul_tflops"]() and 0 < metrics.peak_tflops(torch.device("cpu"), None)


def load_model_flops(path, context: int) -> float:
    from checkpoint import model_from_checkpoint

    model = model_from_checkpoint(load_checkpoint(str(path), "pretrain"))
    return model.flops_per_token(context)


@pytest.mark.slow  # two training runs: the slow tier (CI runs it)
def test_the_written_config_repeats_the_run_bit_for_bit(builtin_data, tmp_path, monkeypatch):
    first, second, flat = tmp_path / "first", tmp_path / "second", tmp_path / "flat"
    pretrain.main(pretrain.parse_args(tiny_pretrain_args(builtin_data, str(first), "--num_epochs", "2")))
    written = first / "checkpoint.yaml"
    assert written.read_text() == (first / "runs" / "config.yaml").read_text()
    again = ["--config", str(written), "--checkpoint_path", str(second / "c.pt"), "--run_dir_path", str(second / "r")]
    pretrain.main(pretrain.parse_args(again))
    monkeypatch.setattr(run_config, "_parse", run_config._parse_flat)  # a machine without PyYAML reads it too
    again = ["--config", str(written), "--checkpoint_path", str(flat / "c.pt"), "--run_dir_path", str(flat / "r")]
    pretrain.main(pretrain.parse_args(again))
    a = load_checkpoint(str(first / "checkpoint.pt"), "pretrain")
    for other in (second / "c.pt", flat / "c.pt"):
        b = load_checkpoint(str(other), "pretrain")
        assert a["step"] == b["step"] > 0 and a["seed"] == b["seed"]
        for name, value in a["model"].items():
            assert torch.equal(value, b["model"][name]), name


def test_config_values_then_the_command_line_win_over_presets(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("model: quickstart\nnum_hidden_layers: 6\nlearning_rate: 1e-3\ncompile: off\n"
                    "activation_checkpointing: true\n")  # YAML reads off as false, 1e-3 as a string: both taken
    args = pretrain.parse_args(["--config", str(path), "--num_hidden_layers", "3"])
    assert args.num_hidden_layers == 3  # the command line over the config
    assert args.learning_rate == 1e-3 and args.compile == "off" and args.activation_checkpointing  # the config
    assert args.embedding_dimensions == 128 and args.token_encoding == "bytes"  # the config's preset


def test_the_presets_read_the_same_without_pyyaml(monkeypatch):
    monkeypatch.setattr(run_config, "_parse", run_config._parse_flat)
    flat = run_config._presets()
    assert flat == run_config.MODEL_PRESETS and set(flat) >= {"small", "xxxlarge", "quickstart"}


@pytest.mark.parametrize("text, fragments", [
    ("learning_rat: 0.1\n", ["'learning_rat' is not a flag", "learning_rate"]),
    ("batch_size: 0\n", ["batch_size", "positive integer", "0"]),
    ("compile: maybe\n", ["compile", "'maybe'", "auto"]),
    ("resume: 1\n", ["resume", "true or false"]),
    ("- a list\n", ["not a mapping"]),
    ("a: [unclosed\n", ["not a YAML mapping"]),
])
def test_a_bad_config_is_one_line(tmp_path, capsys, text, fragments):
    path = tmp_path / "run.yaml"
    path.write_text(text)
    fails_with_one_line(capsys, pretrain, ["--config", str(path)], "--config", *fragments)


def test_a_missing_config_is_one_line(tmp_path, capsys):
    fails_with_one_line(capsys, pretrain, ["--config", str(tmp_path / "none.yaml")], "--config", "none.yaml")


# ----------------------------------------------------------------------------- non-finite steps


def nan_norm_at(monkeypatch, bad_steps: set[int]):
    """Make the global gradient norm NaN at the given (1-based) steps, as a blown-up step would."""
    clip, calls = Parallel.clip_grad_norm_, [0]

    def clip_grad_norm_(self, max_norm):
        calls[0] += 1
        norm = clip(self, max_norm)
        return norm * float("nan") if calls[0] in bad_steps else norm

    monkeypatch.setattr(Parallel, "clip_grad_norm_", clip_grad_norm_)


def test_a_nonfinite_step_stops_the_run_and_keeps_the_last_checkpoint(builtin_data, tmp_path, monkeypatch, capsys):
    argv = tiny_pretrain_args(builtin_data, str(tmp_path))  # checkpoints at steps 4 and 8
    nan_norm_at(monkeypatch, {6})
    before = None

    def keep_first_save(state, path, save=training.save_checkpoint):
        nonlocal before
        save(state, path)
        before = before or open(path, "rb").read()

    monkeypatch.setattr(training, "save_checkpoint", keep_first_save)
    fails_with_one_line(capsys, pretrain, argv, "step 6: non-finite loss or gradient norm", "--nonfinite skip",
                        "checkpoint.pt keeps its last good state")
    assert (tmp_path / "checkpoint.pt").read_bytes() == before  # the step-4 checkpoint, untouched
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")["step"] == 4


def test_skip_drops_the_nonfinite_steps_and_trains_on(builtin_data, tmp_path, monkeypatch, capsys):
    nan_norm_at(monkeypatch, {3, 4})
    pretrain.main(pretrain.parse_args(tiny_pretrain_args(builtin_data, str(tmp_path), "--nonfinite", "skip",
                                                         "--log_interval", "4")))
    out = capsys.readouterr().out
    assert "step 4: loss" in out and "2 steps skipped (non-finite)" in out and "step 8: loss" in out
    state = load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")
    assert state["step"] == 8 and all(torch.isfinite(v).all() for v in state["model"].values())
    run = events(tmp_path / "runs")
    assert [event.value for event in run.Scalars("train/skipped_steps")] == [2]


def test_skip_stops_after_ten_nonfinite_steps_in_a_row(builtin_data, tmp_path, monkeypatch, capsys):
    nan_norm_at(monkeypatch, set(range(3, 17)))
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--nonfinite", "skip", "--num_epochs", "8")
    fails_with_one_line(capsys, pretrain, argv, "steps 3 to 12: 10 non-finite losses or gradient norms in a row")
    assert load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")["step"] == 8  # the last save (step 2's weights)


@pytest.mark.slow
def test_a_nan_adapter_is_refused_before_tuning_and_nothing_is_saved(base, chats, tuned, tmp_path, capsys):
    """The defect: resumed from a LoRA whose A matrix is NaN, tuning ran on at `cross-entropy nan` and saved
    NaN weights over its checkpoint, exit 0."""
    state = load_checkpoint(str(tuned[0] / "lora.pt"), "lora")
    state.pop("sha256")
    name = next(k for k in state["adapters"] if k.endswith("lora_a"))
    state["adapters"][name].fill_(float("nan"))
    out = tmp_path / "out"
    out.mkdir()
    save_checkpoint(state, str(out / "lora.pt"))
    before = (out / "lora.pt").read_bytes()
    argv = tune_args(base, chats, out, "--num_epochs", "8", "--resume")
    for mode in ("stop", "skip"):
        fails_with_one_line(capsys, tune, [*argv, "--nonfinite", mode], "lora.pt holds non-finite weights")
        assert (out / "lora.pt").read_bytes() == before
    assert not os.path.exists(out / "lora-peft")


# ----------------------------------------------------------------------------- out of memory


def raise_oom(*args, **kwargs):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 96.00 GiB")


def test_out_of_memory_in_the_optimizer_step_is_one_line(builtin_data, tmp_path, monkeypatch, capsys):
    from adafactor import Adafactor

    monkeypatch.setattr(Adafactor, "step", raise_oom)
    err = fails_with_one_line(capsys, pretrain, tiny_pretrain_args(builtin_data, str(tmp_path)),
                              "out of memory in the optimizer step 1", "--ddp_sharding_level", "--momentum 0")
    assert "Traceback" not in err and not os.path.exists(tmp_path / "checkpoint.pt")


def test_out_of_memory_gathering_a_checkpoint_is_one_line(builtin_data, tmp_path, monkeypatch, capsys):
    monkeypatch.setattr(pretrain, "checkpoint_state", raise_oom)
    err = fails_with_one_line(capsys, pretrain, tiny_pretrain_args(builtin_data, str(tmp_path)),
                              "out of memory gathering the checkpoint of step 4", "host memory")
    assert "Traceback" not in err and not os.path.exists(tmp_path / "checkpoint.pt")


# ----------------------------------------------------------------------------- Weights & Biases


class FakeWandbRun:
    """What the loop hands W&B, recorded."""

    def __init__(self, **init):
        self.init, self.logged, self.finished = init, [], False

    def log(self, values, step):
        self.logged.append((step, values))

    def finish(self):
        self.finished = True


@pytest.mark.slow  # a training run reporting to (a stand-in for) wandb: the slow tier (CI runs it)
def test_wandb_gets_the_metrics_settings_and_samples(builtin_data, tmp_path, monkeypatch):
    pytest.importorskip("wandb")  # an optional extra (requirements-dev.txt installs it for the tests)
    import wandb

    runs = []
    monkeypatch.setattr(wandb, "init", lambda **init: runs.append(FakeWandbRun(**init)) or runs[-1])
    pretrain.main(pretrain.parse_args(tiny_pretrain_args(builtin_data, str(tmp_path), "--wandb", "lightgpt-tests",
                                                         "--log_interval", "4")))
    (run,) = runs
    assert run.init["project"] == "lightgpt-tests" and run.init["dir"] == str(tmp_path / "runs")
    assert run.init["config"]["seed"] == 7 and run.init["config"]["log_interval"] == 4
    steps = {key: [step for step, values in run.logged if key in values] for key in
             ("train/cross_entropy", "train/tokens_per_s", "test/perplexity", "samples")}
    assert steps == {"train/cross_entropy": [4, 8], "train/tokens_per_s": [4, 8], "test/perplexity": [0, 4, 8],
                     "samples": [0, 4, 8]}
    table = next(values["samples"] for _, values in run.logged if "samples" in values)
    assert table.columns == ["prompt", "continuation"] and table.data[0][0] == pretrain.SAMPLE_PROMPTS[0]
    assert run.finished


@pytest.mark.slow
def test_wandb_offline_writes_its_run_beside_the_events(builtin_data, tmp_path, monkeypatch):
    wandb = pytest.importorskip("wandb")
    monkeypatch.setenv("WANDB_MODE", "offline")
    monkeypatch.setenv("WANDB_SILENT", "true")
    pretrain.main(pretrain.parse_args(tiny_pretrain_args(builtin_data, str(tmp_path), "--wandb", "lightgpt-tests",
                                                         "--num_epochs", "2")))
    (log,) = (tmp_path / "runs" / "wandb").glob("offline-run-*/run-*.wandb")  # what `wandb sync` uploads
    assert log.stat().st_size > 0 and wandb.run is None  # written and finished


def test_wandb_without_the_package_is_one_line(builtin_data, tmp_path, monkeypatch, capsys):
    import importlib.util

    find_spec = importlib.util.find_spec
    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *a: None if name == "wandb" else find_spec(name, *a))
    fails_with_one_line(capsys, pretrain, tiny_pretrain_args(builtin_data, str(tmp_path), "--wandb", "p"),
                        "--wandb p needs the wandb package: pip install wandb")
