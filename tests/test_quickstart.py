"""quickstart.sh's decisions, from its dry run (QUICKSTART_DRY_RUN=1 prints the commands and runs none):
which PyTorch it installs, with and without an NVIDIA GPU (a fake nvidia-smi on PATH), and what it trains.
CI runs the script for real (TINY=1 in .ci/run)."""

import importlib
import os
import shlex
import shutil
import subprocess
import sys

import pytest

import pretrain
from common import model_config
from conftest import ROOT

CPU_INDEX = "https://download.pytorch.org/whl/cpu"
OVERRIDES = ("PYTHON", "VENV", "DEVICE", "TORCH_SPEC", "TORCH_INDEX_URL", "TINY", "RUN_NAME")


def fake_tool(bin_dir, name: str, script: str) -> None:
    path = bin_dir / name
    path.write_text("#!/bin/sh\n" + script + "\n")
    path.chmod(0o755)


def dry_run(tmp_path, gpu: bool | None = None, **env) -> list[str]:
    """Run a copy of quickstart.sh in tmp_path as a dry run. gpu=True puts an nvidia-smi that lists a GPU
    first on PATH, gpu=False one that fails as on a machine without a driver, None none. Returns the
    commands it prints (its '+ ' lines)."""
    shutil.copy(os.path.join(ROOT, "quickstart.sh"), tmp_path)
    bin_dir = tmp_path / "fake-bin"
    bin_dir.mkdir(exist_ok=True)
    if gpu is True:
        fake_tool(bin_dir, "nvidia-smi", "echo 'GPU 0: NVIDIA H200 (UUID: GPU-00000000)'")
    elif gpu is False:
        fake_tool(bin_dir, "nvidia-smi", "echo 'NVIDIA-SMI has failed: no driver' >&2; exit 9")
    environment = {k: v for k, v in os.environ.items() if k not in OVERRIDES}
    environment.update(PATH=f"{bin_dir}{os.pathsep}{os.environ['PATH']}", PYTHON=sys.executable,
                       QUICKSTART_DRY_RUN="1", **env)
    result = subprocess.run(["bash", str(tmp_path / "quickstart.sh")], env=environment, capture_output=True,
                            text=True, timeout=60)
    assert result.returncode == 0, result.stdout + result.stderr
    return [line[2:] for line in result.stdout.splitlines() if line.startswith("+ ")]


def torch_installs(commands: list[str]) -> list[str]:
    """The pip installs of PyTorch (every way, in the order tried), without the interpreter."""
    return [c.split(" -m pip install ", 1)[1] for c in commands if " -m pip install " in c and "requirements" not in c]


def script_args(commands: list[str], script: str, which: int = 0) -> list[str]:
    """The arguments of the script's `which`-th command (generate.py runs more than once)."""
    command = [c for c in commands if f" {script} " in c][which]
    return shlex.split(command.split(f" {script} ", 1)[1].split(" | ")[0])


def assert_cpu_build_only(installs: list[str]) -> None:
    assert installs == ["--no-index --no-deps torch", f"torch --index-url {CPU_INDEX} --timeout 15 --retries 0"]
    for line in installs:  # never PyPI's default torch, which is the CUDA build on Linux
        assert "--no-index" in line or f"--index-url {CPU_INDEX}" in line, line


def test_a_gpu_gets_pypi_torch_and_a_larger_shape_on_cuda(tmp_path):
    commands = dry_run(tmp_path, gpu=True)
    assert torch_installs(commands) == ["torch"]
    args = pretrain.parse_args(script_args(commands, "pretrain.py"))
    assert args.device == "cuda" and args.embedding_dimensions == 512 and args.num_hidden_layers == 8
    model_config(args, 257)  # a shape GPTConfig accepts
    generate = script_args(commands, "generate.py")
    assert generate[generate.index("--device") + 1] == "cuda"
    tune = importlib.import_module("instruction-tune").parse_args(script_args(commands, "instruction-tune.py"))
    assert tune.device == "cuda" and tune.dataset == "builtin" and tune.base_model_path == args.checkpoint_path
    chat = script_args(commands, "generate.py", which=2)
    assert chat[chat.index("--lora_path") + 1] == tune.checkpoint_path


@pytest.mark.skipif(sys.platform == "darwin", reason="on macOS PyPI's torch is the CPU build")
def test_without_a_gpu_only_the_cpu_build_is_installed(tmp_path):
    commands = dry_run(tmp_path, gpu=False)  # nvidia-smi is there but fails, as without a driver
    assert_cpu_build_only(torch_installs(commands))
    assert pretrain.parse_args(script_args(commands, "pretrain.py")).device == "cpu"


@pytest.mark.skipif(shutil.which("nvidia-smi") is not None or sys.platform == "darwin",
                    reason="needs a Linux machine without nvidia-smi")
def test_without_nvidia_smi_only_the_cpu_build_is_installed(tmp_path):
    assert_cpu_build_only(torch_installs(dry_run(tmp_path, gpu=None)))


def test_device_cpu_on_a_gpu_machine_gets_the_cpu_build(tmp_path):
    commands = dry_run(tmp_path, gpu=True, DEVICE="cpu")
    assert_cpu_build_only(torch_installs(commands))
    assert pretrain.parse_args(script_args(commands, "pretrain.py")).device == "cpu"


def test_macos_gets_pypi_torch(tmp_path):
    (tmp_path / "fake-bin").mkdir()
    fake_tool(tmp_path / "fake-bin", "uname", "echo Darwin")
    assert torch_installs(dry_run(tmp_path, gpu=None)) == ["torch"]


def test_torch_spec_and_index_override_the_choice(tmp_path):
    url = "https://example.invalid/whl/cu126"
    commands = dry_run(tmp_path, gpu=False, TORCH_SPEC="torch==2.6.0", TORCH_INDEX_URL=url)
    assert torch_installs(commands) == [f"torch==2.6.0 --index-url {url}"]


@pytest.mark.slow  # a virtual environment is made
def test_an_environment_where_torch_imports_is_reused_and_its_build_kept(tmp_path):
    venv = tmp_path / "env"
    (venv / "bin").mkdir(parents=True)
    fake_tool(venv / "bin", "python", f'exec {shlex.quote(sys.executable)} "$@"')  # this test's Python, with torch
    commands = dry_run(tmp_path, gpu=True, VENV=str(venv))
    assert not any(" -m venv " in c for c in commands)
    assert torch_installs(commands) == []
    from importlib.metadata import version

    (requirements,) = [c for c in commands if "requirements.txt" in c]
    assert requirements.endswith(f"torch=={version('torch')}")  # pinned: a CPU build is never replaced


def test_a_new_environment_is_created_with_python(tmp_path):
    commands = dry_run(tmp_path, gpu=False)
    assert commands[0] == f"{shlex.quote(sys.executable)} -m venv .venv"


def test_on_the_cpu_it_runs_the_readme_quick_start(tmp_path):
    commands = dry_run(tmp_path, gpu=False)
    args = vars(pretrain.parse_args(script_args(commands, "pretrain.py")))
    expected = vars(pretrain.parse_args(["--model", "quickstart"]))  # the README's command (test_presets)
    assert args.pop("checkpoint_path").startswith("./checkpoints/quickstart-")  # its own files per run
    assert args.pop("run_dir_path").startswith("./runs/quickstart-")
    del expected["checkpoint_path"], expected["run_dir_path"]
    assert args == expected


def test_on_the_cpu_it_builds_the_compiled_cpu_kernels_before_training(tmp_path):
    commands = dry_run(tmp_path, gpu=False)
    builds = [i for i, c in enumerate(commands) if c.endswith(" cpu_kernels.py")]
    trains = [i for i, c in enumerate(commands) if " pretrain.py " in c]
    assert len(builds) == 1 and builds[0] < trains[0]
    assert not any("cpu_kernels.py" in c for c in dry_run(tmp_path, gpu=True))  # a GPU never uses them


def test_tiny_is_a_tiny_shape_and_a_few_steps(tmp_path):
    commands = dry_run(tmp_path, gpu=False, TINY="1")
    args = pretrain.parse_args(script_args(commands, "pretrain.py"))
    assert (args.embedding_dimensions, args.num_hidden_layers, args.num_epochs) == (64, 2, 2)
    assert args.num_epochs * args.samples_per_epoch * args.tokens_per_sample <= 20_000


def test_a_second_run_gets_new_files(tmp_path):
    (tmp_path / "checkpoints").mkdir()
    (tmp_path / "checkpoints" / "demo.pt").write_bytes(b"")
    (tmp_path / "runs" / "demo-2").mkdir(parents=True)
    args = pretrain.parse_args(script_args(dry_run(tmp_path, gpu=False, RUN_NAME="demo"), "pretrain.py"))
    assert (args.checkpoint_path, args.run_dir_path) == ("./checkpoints/demo-3.pt", "./runs/demo-3")
    assert not args.resume
