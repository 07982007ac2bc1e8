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

import contextlib

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
        raise RuntimeError(f"optimizer state shard of {tuple(piece.shape)} "
                           f"does not match the parameter shard {expected}")
    return piece


def _full(local: torch.Tensor, like: torch.Tensor, full_shape) -> torch.Tensor:
    """Gather a dim-0-sharded state tensor into the whole tensor (a collective)."""
    if not isinstance(like, DTensor):
        return local
    full_shape = torch.Size(full_shape)
    stride = torch.empty(full_shape, device="meta").stride()
    dt = DTensor.from_local(local, like.device_mesh, like.placements, run_check=False, shape=full_shape, stride=stride)
    return dt.full_tensor()


def _placed(local: torch.Tensor, like: torch.Tensor, full_shape, replicated: bool = False) -> torch.Tensor:
    """A local state tensor as a DTensor placed like the parameter `like` (or replicated over its mesh),
    sharing its storage; the tensor itself where `like` is no DTensor."""
    if not isinstance(like, DTensor):
        return local
    from torch.distributed.tensor import Replicate

    placements = [Replicate()] * like.device_mesh.ndim if replicated else like.placements
    full_shape = torch.Size(full_shape)
    stride = torch.empty(full_shape, device="meta").stride()
    return DTensor.from_local(local, like.device_mesh, placements, run_check=False, shape=full_shape, stride=stride)


# ----------------------------------------------------------------------------- the step's arithmetic
# Three pure functions over lists of tensors, with every per-step number (1 - beta2, step sizes) in
# device tensors: eager they are the algorithm as written; compiled (Adafactor(compile=True)) each one
# becomes a few fused kernels instead of about sixteen launches per matrix, and compiles only once.


def _local_sums(params, grads, row_vars, variances, betas) -> torch.Tensor:
    """Update the local second moments (whole rows) and return this rank's sums behind the whole-tensor
    statistics: every parameter's sum of squares, then per matrix its column sums of grad^2 and the
    sum of its row statistics. row_vars/variances hold None where a parameter has the other kind."""
    sums = [torch.stack(torch._foreach_norm(params)).float().square()]
    for grad, row_var, variance, beta in zip(grads, row_vars, variances, betas):
        if row_var is not None:
            row_mean = torch.linalg.vector_norm(grad, dim=-1, keepdim=True).square_().div_(grad.size(-1))
            row_var.lerp_(row_mean, beta)
            sums.append(torch.linalg.vector_norm(grad.float(), dim=-2).square_().flatten())  # column sums of grad^2
            sums.append(row_var.float().sum().reshape(1))
        else:
            variance.lerp_(grad * grad, beta)
    return torch.cat(sums)


def _foreach_local_sums(params, grads, row_vars, variances, betas) -> torch.Tensor:
    """_local_sums eagerly, with foreach kernels where torch has them and no full-size temporary: a step of
    a small model on the CPU is bound by kernel launches and by fresh memory (page faults), not arithmetic."""
    matrices = [i for i, row_var in enumerate(row_vars) if row_var is not None]
    vectors = [i for i, row_var in enumerate(row_vars) if row_var is None]
    if vectors:
        small = [grads[i] for i in vectors]
        torch._foreach_lerp_([variances[i] for i in vectors], torch._foreach_mul(small, small),
                             [betas[i] for i in vectors])
    sums = [torch.stack(torch._foreach_norm(params)).float().square()]
    if matrices:
        mine, row_means, column_sums = [row_vars[i] for i in matrices], [], []
        for i in matrices:  # grad^2 one matrix at a time: the allocator reuses its memory
            square = grads[i] * grads[i]
            row_means.append(square.mean(-1, keepdim=True))
            column_sums.append(square.sum(-2, dtype=torch.float32))
        torch._foreach_lerp_(mine, row_means, [betas[i] for i in matrices])
        row_sums = torch._foreach_norm(mine, 1)  # the row statistics are >= 0: their 1-norm is their sum
        for column_sum, row_sum in zip(column_sums, row_sums):
            sums += [column_sum.flatten(), row_sum.float().reshape(1)]
    return torch.cat(sums)


def _foreach_updates(grads, row_vars, col_vars, variances, row_var_means, eps1s) -> list[torch.Tensor]:
    """Every parameter's unclipped update, grad / sqrt(second moment), with foreach kernels. A matrix's
    factored moment is row_var x col_var / mean(row_var), so its rsqrt is a row factor times a column
    factor: the update is two broadcast products, with no full-size moment. Each factor is floored at
    eps1 where torch floors their product at eps1^2 (it differs only where a whole row or column of
    gradients has been zero, and there the update is zero either way)."""
    updates = [None] * len(grads)
    matrices = [i for i, row_var in enumerate(row_vars) if row_var is not None]
    vectors = [i for i, row_var in enumerate(row_vars) if row_var is None]
    if matrices:
        floors = [eps1s[i] for i in matrices]
        rows = torch._foreach_div([row_vars[i] for i in matrices],
                                  [row_var_means[i].clamp(min=eps1s[i]) for i in matrices])  # (R, 1) each
        torch._foreach_clamp_min_(rows, floors)
        torch._foreach_rsqrt_(rows)
        columns = torch._foreach_clamp_min([col_vars[i] for i in matrices], floors)  # (1, C) each
        torch._foreach_rsqrt_(columns)
        products = torch._foreach_mul([grads[i] for i in matrices], rows)
        torch._foreach_mul_(products, columns)
        for i, product in zip(matrices, products):
            updates[i] = product
    if vectors:  # new tensors: the second moments stay as they are
        small = torch._foreach_clamp_min([variances[i] for i in vectors], [eps1s[i] * eps1s[i] for i in vectors])
        torch._foreach_rsqrt_(small)
        torch._foreach_mul_(small, [grads[i] for i in vectors])
        for i, update in zip(vectors, small):
            updates[i] = update
    return updates


def _update_columns(means: torch.Tensor, offset: int, col_vars, betas) -> list:
    """Move every matrix's column second moments toward this step's column means (read from `means` past
    `offset`, each matrix's C columns then its row mean) and return the row means (None for vectors)."""
    row_var_means, new_cols, matrix_cols, matrix_betas = [], [], [], []
    for col_var, beta in zip(col_vars, betas):
        if col_var is None:
            row_var_means.append(None)
            continue
        C = col_var.shape[-1]
        new_cols.append(means[offset : offset + C].view(1, C).to(col_var.dtype))
        matrix_cols.append(col_var)
        matrix_betas.append(beta)
        row_var_means.append(means[offset + C])
        offset += C + 1
    if matrix_cols:
        torch._foreach_lerp_(matrix_cols, new_cols, matrix_betas)
    return row_var_means


def _update(grad, row_var, col_var, variance, row_var_mean, eps1: float) -> torch.Tensor:
    """The unclipped update: grad / sqrt(second moment), the moment factored for a matrix."""
    if row_var is not None:
        var_estimate = (row_var @ col_var).div_(row_var_mean.clamp(min=eps1))
    else:
        var_estimate = variance.clone()
    return var_estimate.clamp_(min=eps1 * eps1).rsqrt_().mul_(grad)


def _update_square_sums(grads, row_vars, col_vars, variances, row_var_means, eps1s) -> torch.Tensor:
    """Each update's sum of squares (local rows), recomputing the updates instead of keeping them."""
    return torch.stack([_update(*state, eps1).float().square().sum()
                        for *state, eps1 in zip(grads, row_vars, col_vars, variances, row_var_means, eps1s)])


def _apply_momentum(params, exp_avgs, grads, row_vars, col_vars, variances, row_var_means, eps1s, inverse_clips,
                    step_sizes, beta1: float) -> None:
    """With momentum: exp_avg += (1 - beta1) x (clipped update - exp_avg), then params -= step size x exp_avg."""
    for p, exp_avg, grad, row_var, col_var, variance, mean, eps1, inverse_clip, step_size in zip(
            params, exp_avgs, grads, row_vars, col_vars, variances, row_var_means, eps1s, inverse_clips, step_sizes):
        exp_avg.lerp_(_update(grad, row_var, col_var, variance, mean, eps1).mul_(inverse_clip.to(p.dtype)), 1 - beta1)
        p.add_(exp_avg * step_size.to(p.dtype))


def _apply_updates(params, grads, row_vars, col_vars, variances, row_var_means, eps1s, scales) -> None:
    """params += scale x update, the update recomputed (a fused kernel per parameter when compiled)."""
    for p, grad, row_var, col_var, variance, mean, eps1, scale in zip(
            params, grads, row_vars, col_vars, variances, row_var_means, eps1s, scales):
        p.add_(_update(grad, row_var, col_var, variance, mean, eps1).mul_(scale.to(p.dtype)))


# ----------------------------------------------------------------------------- the compiled CPU step

_cpu_step = None  # lightgpt::adafactor_step_ inside cpu_step_kernel(), else None (the Python step)


@contextlib.contextmanager
def cpu_step_kernel(op):
    """Inside the block, a step over whole fp32 CPU parameters (not sharded, not compile=True) goes through `op`,
    the compiled lightgpt::adafactor_step_ (cpu_kernels.py builds and loads it); None keeps the Python step.
    The previous choice comes back when the block ends."""
    global _cpu_step
    previous, _cpu_step = _cpu_step, op
    try:
        yield
    finally:
        _cpu_step = previous


def _whole_cpu_fp32(params, grads) -> bool:
    return all(p.device.type == "cpu" and p.dtype == torch.float32 and p.is_contiguous() and g.dtype == torch.float32
               and 1 <= p.dim() <= 2 and not g.is_sparse for p, g in zip(params, grads))


class Adafactor(torch.optim.Optimizer):
    """torch.optim.Adafactor's algorithm and defaults, for whole parameters or parameters sharded on
    dim 0. foreach=False (--low_memory_optimizer) works one parameter at a time and recomputes each
    update instead of holding all of them. compile=True runs the arithmetic through torch.compile
    (recomputing the updates, fused, so it is both the fastest and the leanest)."""

    def __init__(self, params, lr: float = 1e-2, beta2_decay: float = -0.8, eps=(None, 1e-3), d: float = 1.0,
                 weight_decay: float = 0.0, *, foreach: bool | None = None, maximize: bool = False, group=None,
                 compile: bool = False, beta1: float = 0.0):
        if not beta2_decay <= 0:
            raise ValueError(f"beta2_decay must be <= 0, got {beta2_decay}")
        if not 0 <= beta1 < 1:
            raise ValueError(f"beta1 must be in [0, 1), got {beta1}")
        defaults = dict(lr=lr, beta2_decay=beta2_decay, eps=eps, d=d, weight_decay=weight_decay,
                        foreach=foreach, maximize=maximize)
        if beta1:  # only then: without momentum the groups are exactly torch.optim.Adafactor's
            defaults["beta1"] = beta1
        super().__init__(params, defaults)
        self.process_group = group  # the group the parameters are sharded over (None: the default group)
        self._divisor_cache: dict[tuple, tuple] = {}  # whole-tensor sizes and divisors on the device, per parameter list
        self.compiled = compile
        wrap = (lambda f: torch.compile(f, fullgraph=True, dynamic=False)) if compile else (lambda f: f)
        self._local_sums, self._update_square_sums, self._apply_updates, self._apply_momentum = (
            wrap(_local_sums), wrap(_update_square_sums), wrap(_apply_updates), wrap(_apply_momentum))

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

    def _host_scalars(self, group, params, grads) -> tuple[list, list, list, list]:
        """Create missing state, count the step (on the CPU, so reading it syncs nothing), and return
        the states and per-parameter 1 - beta2, step-size cap and epsilon, as Python numbers."""
        states, betas, rhos, eps1s = [], [], [], []
        for p, grad in zip(params, grads):
            if grad.dim() > 2:
                raise ValueError("this Adafactor handles parameters of at most 2 dimensions")
            state = self._state_of(p, group)
            states.append(state)
            eps1s.append(torch.finfo(_local(p).dtype).eps if group["eps"][0] is None else group["eps"][0])
        counts = [state["step"] for state in states]
        torch._foreach_add_(counts, 1)
        for step in torch.stack(counts).tolist():  # one read of every count
            betas.append(step ** group["beta2_decay"])  # 1 - beta2_t
            rhos.append(min(group["lr"], 1 / step**0.5))
        return states, betas, rhos, eps1s

    def _state_of(self, p: torch.Tensor, group: dict) -> dict:
        """p's state, created (zeros, step 0) where missing: local shards, shaped as p's local rows are."""
        state, local = self.state[p], _local(p)
        if not state:
            state["step"] = torch.tensor(0.0)
            if local.dim() > 1:
                state["row_var"] = local.new_zeros((*local.shape[:-1], 1))
                state["col_var"] = local.new_zeros((*local.shape[:-2], 1, local.shape[-1]))
            else:
                state["variance"] = torch.zeros_like(local)
        if group.get("beta1", 0.0) and "exp_avg" not in state:  # also for a state loaded without one
            state["exp_avg"] = torch.zeros_like(local)
        return state

    def sharded_state_dict(self) -> dict:
        """Every parameter's state ("0", "1", ... in parameter order) as DTensors placed as the parameter is
        (its rows sharded on dim 0, col_var replicated: it is all-reduced), sharing storage with the state
        itself, for torch.distributed.checkpoint: it saves each rank's shards and loads into them in place,
        resharding across world sizes. Plain tensors where the parameters are (one process). Missing state is
        created first (zeros, step 0), so a fresh optimizer can be loaded into."""
        entries, index = {}, 0
        for group in self.param_groups:
            for p in group["params"]:
                state = self._state_of(p, group)
                entry = {"step": state["step"]}
                for key, value in state.items():
                    if key == "col_var":
                        entry[key] = _placed(value, p, value.shape, replicated=True)
                    elif key != "step":
                        entry[key] = _placed(value, p, (*p.shape[:-1], 1) if key == "row_var" else p.shape)
                entries[str(index)] = entry
                index += 1
        return entries

    def _divisors(self, params, col_vars, device) -> tuple[torch.Tensor, torch.Tensor]:
        """Each parameter's whole-tensor size, and what divides the local sums into means: the sizes, then
        per matrix its whole row count (a DTensor's global shape) for its C column sums and its row sum.
        Made once per parameter list: a host-to-device copy from pageable memory synchronises."""
        key = tuple(id(p) for p in params)
        if key not in self._divisor_cache:
            numels = [float(p.numel()) for p in params]
            rows = [[float(p.shape[0])] * (col_var.shape[-1] + 1) for p, col_var in zip(params, col_vars)
                    if col_var is not None]
            self._divisor_cache[key] = (torch.tensor(numels, device=device),
                                 torch.tensor(numels + [r for matrix in rows for r in matrix], device=device))
        return self._divisor_cache[key]

    def _to_device(self, values: list[float], device) -> torch.Tensor:
        """Host numbers as a device tensor without a synchronising copy from pageable memory."""
        t = torch.tensor(values)
        return t.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else t.to(device)

    def _step_group(self, group) -> None:
        params = [p for p in group["params"] if p.grad is not None]
        if not params:
            return
        sharded = any(isinstance(p, DTensor) for p in params)
        local_params = [_local(p) for p in params]
        grads = [_local(p.grad) for p in params]
        if _cpu_step is not None and not sharded and not self.compiled and _whole_cpu_fp32(local_params, grads):
            self._compiled_cpu_step(group, params, grads)
            return
        if group["maximize"]:
            grads = [-g for g in grads]
        device = local_params[0].device
        states, betas, rhos, eps1s = self._host_scalars(group, params, grads)
        row_vars = [state.get("row_var") for state in states]
        col_vars = [state.get("col_var") for state in states]
        variances = [state.get("variance") for state in states]
        if self.compiled:  # numbers that change every step enter compiled code as tensors, never as constants
            betas = list(self._to_device(betas, device).unbind())

        # Phase 1, local: second moments of whole rows, and the sums behind the whole-tensor statistics.
        eager_foreach = group["foreach"] is not False and not self.compiled  # hold every update: fewer launches
        local_sums = _foreach_local_sums if eager_foreach else self._local_sums
        totals = local_sums(local_params, grads, row_vars, variances, betas)
        self._all_reduce(totals, sharded)

        # Phase 2: whole-tensor statistics -> step sizes (device tensors) and column second moments.
        numels, divisors = self._divisors(params, col_vars, device)
        means = totals / divisors  # mean squares of the weights, column and row means of the second moments
        alphas = means[: len(params)].sqrt().clamp(min=group["eps"][1]) * self._to_device(rhos, device)
        row_var_means = _update_columns(means, len(params), col_vars, betas)
        if group["weight_decay"] != 0:
            torch._foreach_mul_(local_params, 1 - group["lr"] * group["weight_decay"])

        # Phase 3: clip each update by its whole-tensor RMS, then apply it.
        moments = (grads, row_vars, col_vars, variances, row_var_means, eps1s)
        updates = None
        if eager_foreach:
            updates = _foreach_updates(*moments)
            update_sq = torch.stack(torch._foreach_norm(updates)).float().square()
        else:
            update_sq = self._update_square_sums(*moments)
        self._all_reduce(update_sq, sharded)
        clips = ((update_sq / numels).sqrt() / group["d"]).clamp(min=1.0)
        if group.get("beta1", 0.0):
            self._step_with_momentum(group["beta1"], states, local_params, moments, updates, clips, alphas)
            return
        scales = -alphas / clips
        if updates is None:
            self._apply_updates(local_params, *moments, list(scales.unbind()))
        else:
            torch._foreach_addcmul_(local_params, updates, list(scales.to(updates[0].dtype).unbind()))

    def _compiled_cpu_step(self, group, params, grads) -> None:
        """The whole group's step in lightgpt::adafactor_step_ (csrc/cpu_kernels.cpp): the same algorithm in
        three row loops per parameter, with no full-size temporary."""
        states, betas, rhos, eps1s = self._host_scalars(group, params, grads)
        beta1 = group.get("beta1", 0.0)
        _cpu_step(params, grads, [state.get("row_var") for state in states], [state.get("col_var") for state in states],
                  [state.get("variance") for state in states],
                  [state["exp_avg"] if beta1 else None for state in states], betas, rhos, eps1s, group["eps"][1],
                  group["d"], group["lr"], group["weight_decay"], beta1, group["maximize"])

    def _step_with_momentum(self, beta1, states, params, moments, updates, clips, alphas) -> None:
        """Adafactor with momentum (Shazeer & Stern 2018, Algorithm 4 with beta1): exp_avg averages the
        clipped updates, and the weights move by the step size times exp_avg."""
        exp_avgs = [state["exp_avg"] for state in states]
        if updates is None:
            self._apply_momentum(params, exp_avgs, *moments, list((1 / clips).unbind()), list((-alphas).unbind()),
                                 beta1)
            return
        dtype = updates[0].dtype
        torch._foreach_mul_(exp_avgs, beta1)  # exp_avg = beta1 x exp_avg + (1 - beta1) x update / clip
        torch._foreach_addcmul_(exp_avgs, updates, list(((1 - beta1) / clips).to(dtype).unbind()))
        torch._foreach_addcmul_(params, exp_avgs, list((-alphas).to(dtype).unbind()))

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
            if "exp_avg" in state:
                full["exp_avg"] = _full(state["exp_avg"], p, p.shape).cpu()
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
            if "exp_avg" in state:
                piece["exp_avg"] = local_shard(state["exp_avg"], p).to(device, copy=True)
            local["state"][index] = piece
        self.load_state_dict(local)
        for group, kept in zip(self.param_groups, settings):
            group.update(kept)
