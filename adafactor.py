"""Adafactor on FSDP2-sharded parameters, making the same updates as torch.optim.Adafactor does on
whole tensors.

Why not torch.optim.Adafactor itself: on FSDP2's DTensor parameters it fails (an in-place op on a
Partial placement), and run on the raw local shards it would compute its statistics per shard, not per
tensor. Adafactor's update for a (R, C) matrix needs four whole-tensor quantities:
  - RMS(param), which scales the step size,
  - the column means of grad^2 (over all R rows) for the factored second moment,
  - the mean of the row statistics, which normalises the factored estimate,
  - RMS(update), which clips the update.
FSDP2 shards dim 0 (rows), so each rank holds whole rows: row statistics are local, and the four
whole-tensor quantities are sums over rows. This optimizer computes the local sums of every parameter,
all-reduces them in one flat buffer (two collectives per step in all), and applies the same algorithm
as torch.optim.Adafactor. Its state has torch's names and shapes per shard, and
consolidated_state_dict() gathers it into exactly the format torch.optim.Adafactor loads.
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


class ShardedAdafactor(torch.optim.Optimizer):
    """torch.optim.Adafactor's algorithm and defaults, for parameters sharded on dim 0 (or whole)."""

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8, eps=(None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, *, foreach: bool | None = None, maximize: bool = False, group=None):
        if not beta2_decay <= 0:
            raise ValueError(f"beta2_decay must be <= 0, got {beta2_decay}")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                        foreach=foreach, maximize=maximize)
        super().__init__(params, defaults)
        self.process_group = group  # the group the parameters are sharded over (None: the default group)

    def _all_reduce(self, t: torch.Tensor) -> None:
        if dist.is_available() and dist.is_initialized():
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
        lr, d, weight_decay = group["lr"], group["d"], group["weight_decay"]
        eps1, eps2 = group["eps"]
        device = _local(params[0]).device

        # Phase 1, local: step counts, second-moment updates of whole rows, and the local sums that
        # the whole-tensor statistics need.
        entries, sums = [], []
        for p in params:
            grad = _local(p.grad)
            if group["maximize"]:
                grad = -grad
            if grad.dim() > 2:
                raise ValueError("ShardedAdafactor handles parameters of at most 2 dimensions")
            state = self.state[p]
            if not state:
                state["step"] = torch.tensor(0.0)
                if grad.dim() > 1:
                    state["row_var"] = grad.new_zeros((*grad.shape[:-1], 1))
                    state["col_var"] = grad.new_zeros((*grad.shape[:-2], 1, grad.shape[-1]))
                else:
                    state["variance"] = torch.zeros_like(grad)
            state["step"] += 1
            one_minus_beta2 = state["step"].item() ** group["beta2_decay"]
            local_param = _local(p)
            entry = {"p": p, "param": local_param, "grad": grad, "state": state, "beta": one_minus_beta2,
                     "eps1": torch.finfo(local_param.dtype).eps if eps1 is None else eps1}
            sums.append(local_param.float().square().sum().reshape(1))
            if grad.dim() > 1:
                rows = p.shape[0]  # whole-tensor row count (the DTensor's global shape)
                row_mean = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
                state["row_var"].lerp_(row_mean, one_minus_beta2)
                sums.append(grad.float().square().sum(dim=0))  # column sums of grad^2 over local rows
                sums.append(state["row_var"].float().sum().reshape(1))
                entry["rows"] = rows
            else:
                state["variance"].lerp_(grad * grad, one_minus_beta2)
            entries.append(entry)
        totals = torch.cat([s.to(device) for s in sums])
        self._all_reduce(totals)

        # Phase 2: whole-tensor statistics -> updates, and the local sums of update^2.
        offset, update_sums = 0, []
        for e in entries:
            p, state, grad, eps1_ = e["p"], e["state"], e["grad"], e["eps1"]
            param_rms = (totals[offset] / p.numel()).sqrt()
            offset += 1
            step = state["step"].item()
            rho = min(lr, 1 / step**0.5)
            e["alpha"] = torch.clamp(param_rms, min=eps2) * rho
            if weight_decay != 0:
                e["param"].mul_(1 - lr * weight_decay)
            if grad.dim() > 1:
                C = grad.shape[-1]
                col_mean = totals[offset : offset + C].reshape(1, C) / e["rows"]
                offset += C
                row_var_mean = totals[offset] / e["rows"]
                offset += 1
                state["col_var"].lerp_(col_mean.to(state["col_var"].dtype), e["beta"])
                var_estimate = state["row_var"] @ state["col_var"]
                var_estimate.div_(row_var_mean.clamp(min=eps1_))
            else:
                var_estimate = state["variance"].clone()
            update = var_estimate.clamp_(min=eps1_ * eps1_).rsqrt_().mul_(grad)
            e["update"] = update
            update_sums.append(update.float().square().sum().reshape(1))
        update_totals = torch.cat(update_sums)
        self._all_reduce(update_totals)

        # Phase 3: clip each update by its whole-tensor RMS and apply it.
        for e, total in zip(entries, update_totals):
            update_rms = (total / e["p"].numel()).sqrt()
            denom = torch.clamp(update_rms / d, min=1.0)
            e["param"].add_(e["update"] * (-e["alpha"] / denom).to(e["update"].dtype))

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
        """Load a torch.optim.Adafactor state (from any world size), keeping this rank's shards."""
        params = [p for group in self.param_groups for p in group["params"]]
        local = {"state": {}, "param_groups": state_dict["param_groups"]}
        for index, state in state_dict["state"].items():
            p = params[index]
            device = _local(p).device
            piece = {"step": state["step"].clone().cpu()}
            if "row_var" in state:
                piece["row_var"] = local_shard(state["row_var"], p).to(device)
                piece["col_var"] = state["col_var"].to(device)
            else:
                piece["variance"] = local_shard(state["variance"], p).to(device)
            local["state"][index] = piece
        self.load_state_dict(local)
