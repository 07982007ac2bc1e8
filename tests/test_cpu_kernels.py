"""The compiled CPU kernels (cpu_kernels.py, csrc/cpu_kernels.cpp): when training takes them, and that they compute
what the Python path computes. The plumbing tests use stand-in ops and build nothing; the tests marked slow build
the real kernels (about 15 s, once per machine: torch caches the build)."""

import pytest
import torch
import torch.nn.functional as F
from conftest import fails_with_one_line, tiny_pretrain_args

import adafactor
import cpu_kernels
import model
import pretrain
from adafactor import Adafactor
from checkpoint import load_checkpoint

CPU = torch.device("cpu")


# ----------------------------------------------------------------------------- when training takes them


def test_for_training_says_which_path_and_changes_nothing_where_it_does_not_apply(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_kernels, "built", lambda: False)
    loads = []
    monkeypatch.setattr(cpu_kernels, "load", lambda: loads.append(1))
    for choice in ("auto", "on", "off"):  # a compiled run and a GPU run never take them
        for device, compiled in ((CPU, True), (torch.device("cuda"), False)):
            with cpu_kernels.for_training(choice, device, compiled) as note:
                assert note == "" and model._cpu_norm is None and adafactor._cpu_step is None
    with cpu_kernels.for_training("off", CPU, False) as note:
        assert note == "the Python path (--cpu_kernels off)" and model._cpu_norm is None
    with cpu_kernels.for_training("auto", CPU, False) as note:  # auto never builds
        assert "not built yet: python cpu_kernels.py builds them" in note and model._cpu_norm is None
    assert loads == []


def test_auto_takes_a_failed_build_as_the_python_path_and_on_refuses_in_one_line(monkeypatch, capsys, tmp_path,
                                                                                builtin_data):
    monkeypatch.setattr(cpu_kernels, "_loaded", None)
    monkeypatch.setattr(cpu_kernels, "built", lambda: True)
    monkeypatch.setattr(cpu_kernels, "missing_tools", lambda: "no C++ compiler (c++ is not on PATH)")
    with cpu_kernels.for_training("auto", CPU, False) as note:
        assert note == "the Python path (no C++ compiler (c++ is not on PATH))" and model._cpu_norm is None
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--cpu_kernels", "on")
    fails_with_one_line(capsys, pretrain, argv, "--cpu_kernels on: no C++ compiler (c++ is not on PATH)",
                        "--cpu_kernels auto trains without them")
    assert not (tmp_path / "checkpoint.pt").exists()
    fails_with_one_line(capsys, pretrain, tiny_pretrain_args(builtin_data, str(tmp_path), "--cpu_kernels", "fast"),
                        "--cpu_kernels", "fast")


def test_rms_norm_takes_the_kernel_only_when_training_eagerly_on_the_cpu_in_fp32():
    calls = []

    def stand_in(x, weight, eps):  # a scripted op: the norm's answer, recorded
        calls.append(eps)
        return F.rms_norm(x, x.shape[-1:], weight, eps)

    norm, x = model.RMSNorm(8), torch.randn(2, 3, 8)
    with model.cpu_norm_kernel(stand_in):
        y = norm(x)
        assert calls == [torch.finfo(torch.float32).eps]
        with torch.no_grad():
            norm(x)  # evaluation and decoding: torch's own
        model.RMSNorm(8, dtype=torch.float64)(x.double())  # float64: _RMSNormFunction's fallback, torch's
        assert len(calls) == 1
        torch.testing.assert_close(y, torch.nn.RMSNorm(8)(x))
    assert model._cpu_norm is None  # the previous choice is back
    assert norm(x).grad_fn.name().startswith("_RMSNormFunction")


def test_adafactor_takes_the_kernel_for_whole_fp32_cpu_parameters_only():
    calls = []

    def stand_in(params, grads, row_vars, col_vars, variances, exp_avgs, betas, rhos, eps1s, eps2, d, lr,
                 weight_decay, beta1, maximize):
        calls.append((len(params), [r is None for r in row_vars], [m is None for m in exp_avgs], betas, rhos, lr, beta1))

    weight, bias = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(3))
    optimizer = Adafactor([weight, bias], lr=0.01, beta1=0.9)
    weight.grad, bias.grad = torch.ones(4, 3), torch.ones(3)
    before = weight.detach().clone()
    with adafactor.cpu_step_kernel(stand_in):
        optimizer.step()
        optimizer.step()
    assert calls == [(2, [False, True], [False, False], [1.0, 1.0], [0.01, 0.01], 0.01, 0.9),
                     (2, [False, True], [False, False], [2 ** -0.8] * 2, [0.01, 0.01], 0.01, 0.9)]
    assert torch.equal(weight.detach(), before)  # the stand-in moved nothing; the steps were counted
    assert optimizer.state[weight]["step"].item() == 2
    others = [torch.nn.Parameter(torch.randn(2, 2, dtype=torch.float64)),  # float64
              torch.nn.Parameter(torch.randn(3, 2).t()),  # not contiguous
              torch.nn.Parameter(torch.tensor(1.0))]  # a scalar
    for p in others:
        p.grad = torch.ones_like(p)
        with adafactor.cpu_step_kernel(stand_in):
            Adafactor([p]).step()  # the Python step
    assert len(calls) == 2


# ----------------------------------------------------------------------------- the real kernels


@pytest.fixture(scope="module")
def kernels():
    problem = cpu_kernels.load()
    assert problem is None, problem  # the suite's machine has a C++ compiler and ninja (requirements.txt)
    return torch.ops.lightgpt


@pytest.mark.slow
@pytest.mark.parametrize("threads", [1, 2])
def test_rms_norm_kernel_equals_torch_in_float64(kernels, threads):
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        eps = torch.finfo(torch.float32).eps
        for shape in ((12, 64, 128), (3, 5, 1000), (1, 7), (130, 33), (2, 0, 16)):
            x = (torch.randn(shape, dtype=torch.float64) * 3).requires_grad_()
            weight = torch.randn(shape[-1], dtype=torch.float64, requires_grad=True)
            grad = torch.randn(shape, dtype=torch.float64)
            F.rms_norm(x, shape[-1:], weight, eps).backward(grad)
            xs, ws = x.detach().float().requires_grad_(), weight.detach().float().requires_grad_()
            y = kernels.rms_norm(xs, ws, eps)
            y.backward(grad.float())
            torch.testing.assert_close(y.double(), F.rms_norm(x.detach(), shape[-1:], weight.detach(), eps),
                                       rtol=1e-5, atol=1e-5)
            torch.testing.assert_close(xs.grad.double(), x.grad, rtol=1e-4, atol=1e-4)
            torch.testing.assert_close(ws.grad.double(), weight.grad, rtol=1e-4, atol=1e-4)
    finally:
        torch.set_num_threads(previous)


@pytest.mark.slow
def test_rms_norm_kernel_rows_are_independent_and_frozen_inputs_get_no_gradient(kernels):
    x, weight = torch.randn(9, 40), torch.randn(40)
    eps = torch.finfo(torch.float32).eps
    whole = kernels.rms_norm(x, weight, eps)
    for i in range(9):  # a row's result does not depend on the batch around it (exact)
        assert torch.equal(kernels.rms_norm(x[i : i + 1], weight, eps), whole[i : i + 1])
    frozen = weight.clone()  # a LoRA run: the norm's weight frozen, its input trained
    xs = x.clone().requires_grad_()
    kernels.rms_norm(xs, frozen, eps).sum().backward()
    assert xs.grad is not None and frozen.grad is None
    reference = x.clone().requires_grad_()
    F.rms_norm(reference, (40,), weight, eps).sum().backward()
    torch.testing.assert_close(xs.grad, reference.grad, rtol=1e-4, atol=1e-5)
    transposed = torch.randn(40, 9).t()  # not contiguous
    torch.testing.assert_close(kernels.rms_norm(transposed, weight, eps),
                               F.rms_norm(transposed, (40,), weight, eps), rtol=1e-5, atol=1e-6)


@pytest.mark.slow
@pytest.mark.parametrize("beta1,weight_decay,maximize", [(0.0, 0.0, False), (0.9, 0.0, False), (0.9, 0.1, True),
                                                          (0.0, 0.1, False)])
def test_adafactor_kernel_equals_the_python_step(kernels, beta1, weight_decay, maximize):
    torch.manual_seed(0)
    shapes = [(64, 48), (3, 20000), (1000, 7), (37,), (1, 5), (5, 1)]
    python = [torch.nn.Parameter(torch.randn(s)) for s in shapes]
    compiled = [torch.nn.Parameter(p.detach().clone()) for p in python]
    settings = dict(lr=3e-2, beta1=beta1, weight_decay=weight_decay, maximize=maximize)
    a, b = Adafactor(python, **settings), Adafactor(compiled, **settings)
    for step in range(6):
        for p, q in zip(python, compiled):
            g = torch.randn(p.shape) * (10 if step == 2 else 1)  # one step clipped
            if step == 4:
                g[0] = 0  # a row of zeros: its factor floors at eps1
            p.grad, q.grad = g.clone(), g.clone()
        a.step()
        with adafactor.cpu_step_kernel(kernels.adafactor_step_):
            b.step()
        for p, q in zip(python, compiled):
            torch.testing.assert_close(q.detach(), p.detach(), rtol=1e-5, atol=1e-6)
            assert a.state[p].keys() == b.state[q].keys()
            for key in a.state[p]:
                torch.testing.assert_close(b.state[q][key], a.state[p][key], rtol=1e-5, atol=1e-6)
    torch.optim.Adafactor(compiled, lr=3e-2).load_state_dict(b.state_dict())  # still torch's format


@pytest.mark.slow
def test_pretraining_on_the_kernels_follows_the_python_path_and_resumes_on_either(kernels, builtin_data, tmp_path,
                                                                                 capsys):
    def train(path, *extra):
        return pretrain.main(pretrain.parse_args(tiny_pretrain_args(builtin_data, str(path), "--dropout", "0", *extra)))

    train(tmp_path / "python", "--cpu_kernels", "off")
    assert "CPU kernels: the Python path (--cpu_kernels off)" in capsys.readouterr().out
    train(tmp_path / "compiled", "--cpu_kernels", "on")
    assert "CPU kernels: compiled (RMSNorm, Adafactor)" in capsys.readouterr().out
    python = load_checkpoint(str(tmp_path / "python" / "checkpoint.pt"), "pretrain")
    compiled = load_checkpoint(str(tmp_path / "compiled" / "checkpoint.pt"), "pretrain")
    assert python["step"] == compiled["step"] == 8
    for name, weight in python["model"].items():  # 8 steps apart only by rounding
        torch.testing.assert_close(compiled["model"][name], weight, rtol=1e-3, atol=1e-4, msg=name)
    train(tmp_path / "compiled", "--cpu_kernels", "off", "--num_epochs", "5", "--resume")  # resumes on either path
    assert load_checkpoint(str(tmp_path / "compiled" / "checkpoint.pt"), "pretrain")["step"] == 10


@pytest.mark.slow
def test_the_kernels_give_the_same_bits_on_one_thread_and_on_two(kernels):
    torch.manual_seed(0)
    x, weight, grad = torch.randn(4, 300, 96), torch.randn(96), torch.randn(4, 300, 96)
    eps = torch.finfo(torch.float32).eps
    results = []
    previous = torch.get_num_threads()
    try:
        for threads in (1, 2):
            torch.set_num_threads(threads)
            xs, ws = x.clone().requires_grad_(), weight.clone().requires_grad_()
            y = kernels.rms_norm(xs, ws, eps)
            y.backward(grad)
            params = [torch.nn.Parameter(t.clone()) for t in (torch.ones(5000, 40), torch.ones(40))]
            optimizer = Adafactor(params, lr=1e-2, beta1=0.9)
            with adafactor.cpu_step_kernel(kernels.adafactor_step_):
                for step in range(3):
                    for p in params:
                        p.grad = torch.randn(p.shape, generator=torch.Generator().manual_seed(step))
                    optimizer.step()
            results.append([y, xs.grad, ws.grad, *params, optimizer.state[params[0]]["col_var"]])
    finally:
        torch.set_num_threads(previous)
    for a, b in zip(*results):
        assert torch.equal(a, b)


@pytest.mark.slow
def test_the_norm_kernel_under_activation_checkpointing_and_lora(kernels, tiny_config):
    from lora import LoRAConfig, add_lora

    torch.manual_seed(0)
    idx = torch.randint(0, tiny_config.vocabulary_size, (2, 24))

    def gradients(checkpointing: bool, op, lora: bool):
        torch.manual_seed(0)
        gpt = model.GPT(tiny_config)
        if lora:
            gpt = add_lora(gpt, LoRAConfig(rank=4, alpha=8.0, dropout=0.0))
        gpt.set_activation_checkpointing(checkpointing)
        gpt.train()
        with model.cpu_norm_kernel(op):
            gpt(idx, idx).backward()
        return {name: p.grad for name, p in gpt.named_parameters() if p.grad is not None}

    for lora in (False, True):
        python = gradients(False, None, lora)
        plain, recomputed = gradients(False, kernels.rms_norm, lora), gradients(True, kernels.rms_norm, lora)
        assert python.keys() == plain.keys() == recomputed.keys() and python
        assert lora == all("norm" not in name for name in python)  # LoRA: the norms' weights frozen
        for name in python:
            assert torch.equal(recomputed[name], plain[name]), name  # the recomputation is the same computation
            torch.testing.assert_close(plain[name], python[name], rtol=1e-4, atol=1e-5, msg=name)


@pytest.mark.slow
def test_a_build_that_fails_says_the_compilers_error_in_one_line(monkeypatch, tmp_path):
    broken = tmp_path / "broken.cpp"
    broken.write_text("#include <torch/library.h>\nint main() { return undeclared_name; }\n")
    monkeypatch.setenv("TORCH_EXTENSIONS_DIR", str(tmp_path / "extensions"))
    monkeypatch.setattr(cpu_kernels, "SOURCE", str(broken))
    monkeypatch.setattr(cpu_kernels, "NAME", "lightgpt_broken_for_a_test")
    problem = cpu_kernels.load()
    assert problem.startswith(f"building {broken} failed: ") and "error" in problem and "undeclared_name" in problem
    assert "\n" not in problem and "-MMD" not in problem  # the compiler's line, not the compile command
    with cpu_kernels.for_training("auto", CPU, False) as note:  # auto trains on
        assert note == f"the Python path ({problem})" and model._cpu_norm is None
