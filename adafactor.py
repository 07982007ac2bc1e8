"""Adafactor: torch.optim.Adafactor's algorithm, without host syncs, on whole or FSDP2-sharded parameters.

Why not torch.optim.Adafactor itself:
- On FSDP2's DTensor parameters it fails (an in-place op on a Partial placement), and run on the raw
  local shards it would compute its statistics per shard, not per tensor.
- It reads two numbers back to the host for every parameter at every step (the parameter's RMS and the
  update's RMS, via .item()), which stalls the GPU about 2 x (number of parameters) times per step.

Adafactor's update for a (R, C) matrix needs four whole-tensor quantities: RMS(param), which scales the
step size; the column means of grad^2 over all R rows, for the factored second moment; the mean of the
row statistics, which normalises the factored estimate; and RMS(update), which clips the update.
FSDP2 shards dim 0 (rows), so each rank holds whole rows: row statistics are local and the four
quantities are sums over rows. This optimizer computes the local sums of every parameter, all-reduces
them in one flat buffer when the parameters are sharded (two collectives per step in all), keeps every
step-size factor on the device, and applies the same algorithm as torch.optim.Adafactor. Its state has
torch's names and shapes (per shard), and consolidated_state_dict() gathers it into exactly the format
torch.optim.Adafactor loads.
"""

from __future__ import annotations

import torch
import torch.distributed as dist
from torch.distributed.tensor import DTensor


def _local(t: torch.Tensor) -> torch.Tensor:
    return t.to_local() if isinstance(t, DTensor) else t


def local_shard(full: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """This rank's dim-0 shard of `full`, cut the way FSDP2 cuts the parameter `like` (torch.chunk)."""
    if not isinstance(like, DTensor):
        return full
    mesh = like.device_mesh
    rank, world = mesh.get_local_rank(), mesh.size()
    chunks = torch.chunk(full, world, dim=0)
    piece = chunks[rank] if rank < len(chunks) else full.new_empty((0, *full.shape[1:]))
    expected = tuple(like.to_local().shape[:1])
    if tuple(piece.shape[:1]) != expected:
        raise RuntimeError(f"optimizer state shard of {tuple(piece.shape)} does not match the parameter shard {expected}")
    return piece


def _full(local: torch.Tensor, like: torch.Tensor, full_shape) -> torch.Tensor:
    """Gather a dim-0-sharded state tensor into the whole tensor (a collective)."""
    if not isinstance(like, DTensor):
        return local
    full_shape = torch.Size(full_shape)
    stride = torch.empty(full_shape, device="meta").stride()
    dt = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=full_shape, stride=stride)
    return dt.full_tensor()


class Adafactor(torch.optim.Optimizer):
    """torch.optim.Adafactor's algorithm and defaults, for whole parameters or parameters sharded on
    dim 0. foreach=False (--low_memory_optimizer) works one parameter at a time and recomputes each
    update instead of holding all of them."""

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8, eps=(None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, *, foreach: bool | None = None, maximize: bool = False, group=None):
        if not beta2_decay <= 0:
            raise ValueError(f"beta2_decay must be <= 0, got {beta2_decay}")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                        foreach=foreach, maximize=maximize)
        super().__init__(params, defaults)
        self.process_group = group  # the group the parameters are sharded over (None: the default group)
        self._numels: dict[tuple, torch.Tensor] = {}  # whole-tensor sizes on the device, per parameter list

    def _all_reduce(self, t: torch.Tensor, sharded: bool) -> None:
        if sharded and dist.is_available() and dist.is_initialized():
            dist.all_reduce(t, group=self.process_group)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            self._step_group(group)
        return loss

    def _step_group(self, group) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        lr, d, weight_decay, eps2 = group["lr"], group["d"], group["weight_decay"], group["eps"][1]
        foreach = group["foreach"] is not False
        sharded = any(isinstance(p, DTensor) for p in params)
        device = _local(params[0]).device
        local_params = [_local(p) for p in params]
        grads = [_local(p.grad) for p in params]
        if group["maximize"]:
            grads = [-g for g in grads]

        # Phase 1, local: step counts (on the CPU, so reading them syncs nothing), second moments of
        # whole rows, and the local sums behind the whole-tensor statistics.
        states, betas, rhos, eps1s = [], [], [], []
        for p, lp, grad in zip(params, local_params, grads):
            if grad.dim() > 2:
                raise ValueError("this Adafactor handles parameters of at most 2 dimensions")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                if grad.dim() > 1:
                    state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
                    state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
                else:
                    state["variance"] = torch.zeros_like(grad)
            state["step"] += 1
            step = state["step"].item()
            states.append(state)
            betas.append(step ** group["beta2_decay"])  # 1 - beta2_t
            rhos.append(min(lr, 1 / step**0.5))
            eps1s.append(torch.finfo(lp.dtype).eps if group["eps"][0] is None else group["eps"][0])

        param_sq = torch.stack(torch._foreach_norm(local_params) if foreach else [lp.norm() for lp in local_params]).float().square()
        sums = [param_sq]
        for grad, state, beta in zip(grads, states, betas):
            if grad.dim() > 1:
                row_mean = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
                state["row_var"].lerp_(row_mean, beta)
                sums.append(torch.linalg.vector_norm(grad.float(), dim=-2).square_().flatten())  # column sums of grad^2
                sums.append(state["row_var"].float().sum().reshape(1))
            else:
                state["variance"].lerp_(grad * grad, beta)
        totals = torch.cat([s.to(device) for s in sums])
        self._all_reduce(totals, sharded)

        # Phase 2: whole-tensor statistics -> step sizes (device tensors) and column second moments.
        key = tuple(id(p) for p in params)
        if key not in self._numels:  # made once: a host-to-device copy from pageable memory synchronises
            self._numels[key] = torch.tensor([float(p.numel()) for p in params], device=device)
        numels = self._numels[key]
        rhos = torch.tensor(rhos)
        if device.type == "cuda":
            rhos = rhos.pin_memory()
        alphas = (totals[: len(params)] / numels).sqrt().clamp(min=eps2) * rhos.to(device, non_blocking=True)
        offset = len(params)
        row_var_means = []
        for p, grad, state, beta in zip(params, grads, states, betas):
            if grad.dim() > 1:
                rows, C = p.shape[0], grad.shape[-1]  # whole-tensor row count (a DTensor's global shape)
                state["col_var"].lerp_((totals[offset : offset + C] / rows).view(1, C).to(state["col_var"].dtype), beta)
                row_var_means.append(totals[offset + C] / rows)
                offset += C + 1
            else:
                row_var_means.append(None)
        if weight_decay != 0:
            torch._foreach_mul_(local_params, 1 - lr * weight_decay)

        def update(i: int) -> torch.Tensor:
            state, eps1 = states[i], eps1s[i]
            if "row_var" in state:
                var_estimate = (state["row_var"] @ state["col_var"]).div_(row_var_means[i].clamp(min=eps1))
            else:
                var_estimate = state["variance"].clone()
            return var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grads[i])

        # Phase 3: clip each update by its whole-tensor RMS, then apply it.
        if foreach:
            updates = [update(i) for i in range(len(params))]
            update_sq = torch.stack(torch._foreach_norm(updates)).float().square()
        else:
            update_sq = torch.stack([update(i).float().square().sum() for i in range(len(params))])
        self._all_reduce(update_sq, sharded)
        scales = -alphas / ((update_sq / numels).sqrt() / d).clamp(min=1.0)
        if foreach:
            torch._foreach_mul_(updates, list(scales.to(updates[0].dtype).unbind()))
            torch._foreach_add_(local_params, updates)
        else:
            for i, lp in enumerate(local_params):
                lp.add_(update(i).mul_(scales[i].to(lp.dtype)))

    # ------------------------------------------------------------------------- consolidated state

    def consolidated_state_dict(self) -> dict:
        """The whole-tensor state in torch.optim.Adafactor's format, on the CPU (a collective: every
        rank must call it; every rank gets the result)."""
        state_dict = self.state_dict()
        params = [p for group in self.param_groups for p in group["params"]]
        for index, p in enumerate(params):
            state = state_dict["state"].get(index)
            if not state:
                continue
            full = {"step": state["step"].clone()}
            if "row_var" in state:
                full["row_var"] = _full(state["row_var"], p, (*p.shape[:-1], 1)).cpu()
                full["col_var"] = state["col_var"].cpu()  # all-reduced: the same on every rank
            else:
                full["variance"] = _full(state["variance"], p, p.shape).cpu()
            state_dict["state"][index] = full
        return state_dict

    def load_consolidated_state_dict(self, state_dict: dict) -> None:
        """Load a torch.optim.Adafactor state (from any world size), keeping this rank's shards. The
        hyperparameters stay those this optimizer was made with (e.g. a resumed run's new flags)."""
        settings = [{k: v for k, v in g.items() if k != "params"} for g in self.param_groups]
        params = [p for group in self.param_groups for p in group["params"]]
        local = {"state": {}, "param_groups": state_dict["param_groups"]}
        for index, state in state_dict["state"].items():
            p = params[index]
            device = _local(p).device
            piece = {"step": state["step"].clone().cpu()}
            if "row_var" in state:  # copies: the optimizer must never share tensors with the caller's dict
                piece["row_var"] = local_shard(state["row_var"], p).to(device, copy=True)
                piece["col_var"] = state["col_var"].to(device, copy=True)
            else:
                piece["variance"] = local_shard(state["variance"], p).to(device, copy=True)
            local["state"][index] = piece
        self.load_state_dict(local)
        for group, kept in zip(self.param_groups, settings):
            group.update(kept)
