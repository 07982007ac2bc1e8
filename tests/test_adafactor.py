import pytest
import torch

from adafactor import Adafactor


def make_params(seed=0):
    g = torch.Generator().manual_seed(seed)
    return [torch.randn(7, 5, generator=g).requires_grad_(), torch.randn(5, generator=g).requires_grad_(),
            torch.randn(3, 9, generator=g).requires_grad_()]


def run(optimizer_class, steps, params, **kwargs):
    optimizer = optimizer_class(params, **kwargs)
    g = torch.Generator().manual_seed(1)
    for step in range(steps):
        for p in params:
            p.grad = torch.randn(p.shape, generator=g) * (step + 1)
        for group in optimizer.param_groups:
            group["lr"] = 1e-2 / (step + 1)  # the training loop changes lr every step
        optimizer.step()
    return optimizer


@pytest.mark.parametrize("foreach", [True, False])
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1, "beta2_decay": -0.5, "d": 2.0}, {"maximize": True}])
def test_same_updates_and_state_as_torch_adafactor(foreach, options):
    ours, theirs = make_params(), make_params()
    mine = run(Adafactor, 6, ours, foreach=foreach, **options)
    reference = run(torch.optim.Adafactor, 6, theirs, foreach=foreach, **options)
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    mine_state, ref_state = mine.state_dict(), reference.state_dict()
    assert mine_state["param_groups"] == ref_state["param_groups"]
    for i, state in ref_state["state"].items():
        assert state.keys() == mine_state["state"][i].keys()
        for key in state:
            torch.testing.assert_close(mine_state["state"][i][key], state[key], rtol=1e-5, atol=1e-7)


def test_state_moves_between_torch_adafactor_and_ours():
    ours, theirs = make_params(), make_params()
    reference = run(torch.optim.Adafactor, 3, theirs)
    mine = Adafactor(ours)
    for a, b in zip(ours, theirs):
        a.data.copy_(b.data)
    mine.load_consolidated_state_dict(reference.state_dict())
    for opt, params in ((mine, ours), (reference, theirs)):
        for p in params:
            p.grad = torch.ones_like(p)
        opt.param_groups[0]["lr"] = 1e-3  # the training loop sets the rate at every step
        opt.step()
    for a, b in zip(ours, theirs):
        torch.testing.assert_close(a, b)
    back = torch.optim.Adafactor(make_params())
    back.load_state_dict(mine.consolidated_state_dict())  # and torch's optimizer loads ours
    assert back.state_dict()["state"][0]["step"].item() == 4


def test_rejects_tensors_of_more_than_two_dimensions():
    p = torch.zeros(2, 2, 2, requires_grad=True)
    p.grad = torch.ones_like(p)
    with pytest.raises(ValueError, match="at most 2 dimensions"):
        Adafactor([p]).step()


def test_loading_state_keeps_the_new_settings():
    """A resumed run may change --low_memory_optimizer or --rms_decay: the flags win over the file."""
    saved = run(Adafactor, 2, make_params(), foreach=True, beta2_decay=-0.8)
    resumed = Adafactor(make_params(), foreach=False, beta2_decay=-0.5)
    resumed.load_consolidated_state_dict(saved.consolidated_state_dict())
    assert resumed.param_groups[0]["foreach"] is False and resumed.param_groups[0]["beta2_decay"] == -0.5
    assert resumed.state_dict()["state"][0]["step"].item() == 2


@pytest.mark.slow  # torch.compile of the optimizer's arithmetic
@pytest.mark.parametrize("options", [{}, {"weight_decay": 0.1, "maximize": True}, {"beta1": 0.9}])
def test_compiled_arithmetic_gives_the_same_updates(options):
    """compile=True fuses the step's arithmetic; parameters and state must match the eager optimizer."""
    eager, fused = make_params(), make_params()
    reference = run(Adafactor, 6, eager, **options)
    compiled = run(Adafactor, 6, fused, compile=True, **options)
    for a, b in zip(eager, fused):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-6)
    for i, state in reference.state_dict()["state"].items():
        for key in state:
            torch.testing.assert_close(compiled.state_dict()["state"][i][key], state[key], rtol=1e-5, atol=1e-7)


@pytest.mark.parametrize("foreach", [True, False])
def test_momentum_averages_torchs_clipped_updates(foreach):
    """beta1 > 0 (Shazeer & Stern's Adafactor with momentum): each step moves the weights by the step size
    times an average of the clipped updates torch.optim.Adafactor would make from the same weights."""
    beta1, steps = 0.9, 5
    ours = make_params()
    optimizer = Adafactor(ours, lr=1e-2, foreach=foreach, beta1=beta1)
    theirs = [p.detach().clone().requires_grad_() for p in ours]
    reference = torch.optim.Adafactor(theirs, lr=1e-2)
    averages = [torch.zeros_like(p) for p in ours]
    g = torch.Generator().manual_seed(1)
    for step in range(1, steps + 1):
        with torch.no_grad():
            for p, q in zip(ours, theirs):
                q.copy_(p)
        before = [p.detach().clone() for p in ours]
        for p, q in zip(ours, theirs):
            p.grad = torch.randn(p.shape, generator=g)
            q.grad = p.grad.clone()
        optimizer.step()
        reference.step()  # the same second moments; its move is -step size x the clipped update
        for p, q, b, m in zip(ours, theirs, before, averages):
            size = min(1e-2, step**-0.5) * max(1e-3, b.pow(2).mean().sqrt().item())
            m.lerp_((b - q.detach()) / size, 1 - beta1)
            torch.testing.assert_close(p.detach(), b - size * m, rtol=1e-5, atol=1e-6)
    state = optimizer.consolidated_state_dict()
    for i, m in enumerate(averages):  # m was recovered from differences of weights: fp32 cancellation
        torch.testing.assert_close(state["state"][i]["exp_avg"], m, rtol=1e-3, atol=1e-3)
    resumed = Adafactor(make_params(), beta1=beta1)
    resumed.load_consolidated_state_dict(state)
    assert torch.equal(resumed.state_dict()["state"][0]["exp_avg"], state["state"][0]["exp_avg"])
    assert "beta1" not in Adafactor(make_params()).param_groups[0]  # off: torch's groups exactly
    with pytest.raises(ValueError, match="beta1"):
        Adafactor(make_params(), beta1=1.0)
