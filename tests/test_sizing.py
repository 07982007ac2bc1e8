"""sizing.py against the program: parameter counts of the real model (meta device, the card's six shapes),
saved-activation bytes against autograd's own saved tensors, a real training step's peak memory on the
CPU, Adafactor's real state, the sharding arithmetic; and model_sizing.ipynb, run headless."""

import math
import os
import re
from dataclasses import replace

import pytest
import torch
from conftest import ROOT

import model as model_module
import sizing
from adafactor import Adafactor
from chat import SPECIAL_TOKENS
from data import VOCABULARY_SIZES
from run_config import MODEL_PRESETS
from lora import LoRAConfig, add_lora, grow_vocabulary, trainable_by_kind
from model import GPT, GPTConfig
from parallel import training_memory
from sizing import GIB, Plan

NOTEBOOK = os.path.join(ROOT, "model_sizing.ipynb")
CPU = dict(precision="fp32", kernels="cpu")  # what this machine runs, so the program can be asked
SHAPES = [(300, 32, 4, 2, 4), (1000, 64, 8, 3, 2), (500, 48, 2, 2, 1)]  # vocabulary, width, heads, layers, ratio


def tiny_plan(shape, **settings) -> Plan:
    return Plan(*shape, **{"batch_size": 3, "tokens_per_sample": 24, **CPU, **settings})


def meta(config: GPTConfig) -> GPT:
    with torch.device("meta"):
        return GPT(config)


# ----------------------------------------------------------------------------- parameters


@pytest.mark.parametrize("name", sizing.CARD)
def test_parameter_counts_of_the_card_shapes_are_the_models(name):
    """Built on the meta device (XXX-large is 105B parameters, no memory): the total is the model's
    count, the split adds up, the bytes are the weights' storage, and LoRA's count is add_lora's."""
    config = Plan.preset(name).config
    assert (config.vocabulary_size, config.embedding_dimensions) == (
        VOCABULARY_SIZES[MODEL_PRESETS[name]["token_encoding"]], MODEL_PRESETS[name]["embedding_dimensions"])
    model = meta(config)
    stored = sum(p.numel() for p in model.parameters())
    counts = sizing.parameters(config, lora_rank=8)
    padding = (config.padded_vocabulary_size - config.vocabulary_size) * config.embedding_dimensions
    assert counts["total"] == stored - padding == model.num_parameters()
    assert counts["embedding"] + counts["non_embedding"] == counts["total"]
    assert counts["per_block"] == sum(p.numel() for p in model.blocks[0].parameters())
    assert counts["total"] == (config.num_hidden_layers * counts["per_block"] + config.embedding_dimensions
                               + counts["embedding"])
    assert sizing.weight_bytes(config) == 4 * stored
    adapted = add_lora(model, LoRAConfig(8, 1.0, 0.0))
    assert counts["lora"] == sum(p.numel() for p in adapted.parameters() if p.requires_grad)
    assert counts["trainable"] == counts["lora"] + len(SPECIAL_TOKENS) * config.embedding_dimensions


def test_the_card_shapes_have_the_cards_sizes():
    """The suggested shapes' parameter column (docs/sizing.md), to one decimal, and the card's token budgets."""
    expected = {"small": "353.5M", "medium": "1.7B", "large": "6.9B", "xlarge": "13.3B", "xxlarge": "53.2B",
                "xxxlarge": "104.7B"}
    for name, text in expected.items():
        assert sizing.human(sizing.parameters(Plan.preset(name).config)["total"]) == text
    assert [tokens for _, tokens in sizing.CARD.values()] == [7e9, 34e9, 132e9, 262e9, 1e12, 2e12]


# ----------------------------------------------------------------------------- activations


@pytest.mark.parametrize("shape", SHAPES)
@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("checkpointing", [False, True])
@pytest.mark.parametrize("tokens", [16, 40])
def test_saved_activation_bytes_are_what_autograd_saves(shape, dropout, checkpointing, tokens, monkeypatch):
    """Predicted bytes against the tensors autograd saves in a real forward pass (saved_tensors_hooks, each
    storage once, parameters left out), fp32 on the CPU: there attention takes the CPU's flash kernel
    without dropout (q, k, v, output and log-sum-exp) and the math path with it (T x T probabilities,
    dropout mask and dropped probabilities), and RMSNorm saves x / rms too. Within 10% (it is exact here).
    The norm is torch's own, as on a GPU: eager CPU training takes model._RMSNormFunction, which saves less."""
    monkeypatch.setattr(model_module.RMSNorm, "forward", torch.nn.RMSNorm.forward)
    plan = tiny_plan(shape, dropout=dropout, activation_checkpointing=checkpointing, tokens_per_sample=tokens)
    torch.manual_seed(0)
    model = GPT(plan.config).train()
    model.set_activation_checkpointing(checkpointing)
    idx = torch.randint(0, plan.vocabulary_size, (plan.batch_size, tokens))
    counted = sizing.saved_tensor_bytes(model, idx, torch.roll(idx, -1, 1))
    predicted = sizing.activations(plan)["saved"]
    assert abs(predicted / counted - 1) < 0.10, (predicted, counted)


@pytest.mark.parametrize("shape", SHAPES[:2])
@pytest.mark.parametrize("checkpointing", [False, True])
def test_lora_activation_bytes_are_what_autograd_saves(shape, checkpointing):
    """Instruction tuning: a frozen base keeps little of its inputs, the adapters keep theirs (dropped out)
    and their rank-r middles, packed rows' attention keeps its document mask."""
    plan = tiny_plan(shape, dropout=0.0, lora_rank=4, lora_dropout=0.05, activation_checkpointing=checkpointing)
    torch.manual_seed(0)
    V, new = plan.vocabulary_size, len(SPECIAL_TOKENS)
    model = add_lora(grow_vocabulary(GPT(plan.config), new), LoRAConfig(4, 1.0, 0.05), trainable_rows=(V, new)).train()
    model.set_activation_checkpointing(checkpointing)
    B, T = plan.batch_size, plan.tokens_per_sample
    idx = torch.randint(0, V, (B, T))
    documents = (torch.arange(T) >= T // 3).long().expand(B, T)  # two conversations a row
    counted = sizing.saved_tensor_bytes(model, idx, torch.roll(idx, -1, 1), documents)
    predicted = sizing.activations(plan)["saved"]
    assert abs(predicted / counted - 1) < 0.10, (predicted, counted)


def measured_step_peak(plan: Plan) -> int:
    """Peak bytes allocated above the start of one real training step (forward, backward, clipping,
    Adafactor), from the profiler's allocation records; weights and optimizer state exist before it."""
    from torch.profiler import ProfilerActivity, profile

    torch.manual_seed(0)
    model = GPT(plan.config).train()
    model.set_activation_checkpointing(plan.activation_checkpointing)
    optimizer = Adafactor(model.parameters(), foreach=not plan.low_memory_optimizer)
    x = torch.randint(0, plan.vocabulary_size, (plan.batch_size, plan.tokens_per_sample))
    A = plan.gradient_accumulation_steps

    def step():
        for _ in range(A):
            (model(x, torch.roll(x, -1, 1)) / A).backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), 1.0, foreach=True)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)

    step()  # the optimizer's state
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        step()
    events = sorted((e for e in prof.profiler.kineto_results.events() if e.name() == "[memory]"),
                    key=lambda e: e.start_ns())
    now = peak = 0
    for e in events:
        now += e.nbytes()
        peak = max(peak, now)
    return peak


@pytest.mark.parametrize("shape, checkpointing, accumulation, chunk", [
    (SHAPES[0], False, 1, None), (SHAPES[1], True, 1, None), (SHAPES[1], True, 2, 2**16),
    ((2000, 128, 4, 2, 4), False, 2, 2**16), ((2000, 128, 4, 2, 4), True, 1, 2**16)])
def test_a_training_steps_peak_memory_is_predicted(monkeypatch, shape, checkpointing, accumulation, chunk):
    """The whole step, as the CPU runs it: forward (with the loss in several chunks where `chunk` shrinks
    them), backward block by block, the optimizer. Predicted peak above the weights and optimizer state
    within 10% of the allocations the profiler recorded."""
    if chunk:
        monkeypatch.setattr(model_module, "LOGITS_CHUNK_BYTES", chunk)
    plan = tiny_plan(shape, dropout=0.1, batch_size=4, tokens_per_sample=64, activation_checkpointing=checkpointing,
                     gradient_accumulation_steps=accumulation)
    if chunk:
        assert math.ceil(4 * 64 / model_module._chunk_rows(4 * 64, plan.config.padded_vocabulary_size)) > 1
    t = sizing.memory(plan)
    predicted = t["peak"] - t["weights"] - t["optimizer_state"]
    measured = measured_step_peak(plan)
    assert abs(predicted / measured - 1) < 0.10, (predicted, measured, t["phase"])


def test_checkpointing_and_sharding_lower_the_peak_and_batch_raises_it():
    plan = Plan.preset("small", world_size=8, sharding_level=0)
    peaks = [sizing.memory(replace(plan, sharding_level=level))["peak"] for level in (0, 2, 3)]
    assert peaks[0] > peaks[1] > peaks[2]
    assert sizing.memory(replace(plan, activation_checkpointing=True))["peak"] < sizing.memory(plan)["peak"]
    assert sizing.memory(plan, 32)["peak"] > sizing.memory(plan, 16)["peak"]
    act = sizing.activations(plan)
    assert act["saved"] < sizing.activations(replace(plan, batch_size=32))["saved"] < 2 * act["saved"]


def test_the_largest_batch_that_fits_is_the_last_that_does():
    plan = Plan.preset("medium", activation_checkpointing=True)
    for gib in sizing.GPU_SIZES_GIB:
        b = sizing.largest_batch(plan, gib * GIB)
        assert b > 0 and sizing.memory(plan, b)["peak"] <= gib * GIB < sizing.memory(plan, b + 1)["peak"]
    assert sizing.largest_batch(Plan.preset("xxxlarge"), 24 * GIB) == 0  # its weights alone are 390 GiB


# ----------------------------------------------------------------------------- optimizer and sharding


def state_bytes(optimizer) -> int:
    """The optimizer's real state on the device (its step counters live on the host)."""
    return sum(v.numel() * v.element_size() for state in optimizer.state.values() for k, v in state.items()
               if k != "step")


@pytest.mark.parametrize("low_memory", [False, True])
def test_adafactor_state_bytes_are_the_optimizers(tiny_config, low_memory):
    torch.manual_seed(0)
    model = GPT(tiny_config)
    optimizer = Adafactor(model.parameters(), foreach=not low_memory)
    x = torch.randint(0, tiny_config.vocabulary_size, (2, 16))
    model(x, x).backward()
    assert sum(p.grad.numel() * p.grad.element_size() for p in model.parameters()) == sizing.gradient_bytes(tiny_config)
    optimizer.step()
    assert state_bytes(optimizer) == sizing.adafactor_state_bytes(tiny_config)
    assert sizing.adamw_state_bytes(tiny_config) == 2 * sizing.gradient_bytes(tiny_config)
    adamw = torch.optim.AdamW(model.parameters())
    adamw.step()
    assert state_bytes(adamw) == sizing.adamw_state_bytes(tiny_config)


def test_lora_optimizer_state_bytes_are_the_optimizers(tiny_config):
    """instruction-tune.py's model and optimizer: only the adapters and the new token rows train."""
    torch.manual_seed(0)
    new = len(SPECIAL_TOKENS)
    V = tiny_config.vocabulary_size
    model = add_lora(grow_vocabulary(GPT(tiny_config), new), LoRAConfig(4, 1.0, 0.0), trainable_rows=(V, new))
    optimizer = Adafactor([{"params": ps} for ps in trainable_by_kind(model).values()])
    x = torch.randint(0, V, (2, 16))
    model(x, x).backward()
    optimizer.step()
    grown = replace(tiny_config, vocabulary_size=V + new, dropout=0.0)
    assert state_bytes(optimizer) == sizing.adafactor_state_bytes(grown, lora_rank=4)
    trainable = [p for p in model.parameters() if p.requires_grad]
    assert sum(p.grad.numel() * 4 for p in trainable) == sizing.gradient_bytes(grown, lora_rank=4)
    assert Plan(V, 32, 4, 2, lora_rank=4).trained_config == grown


@pytest.mark.parametrize("shards", [2, 3, 8])
def test_sharded_bytes_are_fsdp2s_dim0_pieces(tiny_config, shards):
    """FSDP2 cuts every parameter on dim 0 as torch.chunk does (adafactor.local_shard's rule), padding the
    pieces to equal size: a rank holds at most the first (largest) piece of each. Adafactor's row statistics
    follow the rows; its column statistics are all-reduced, whole on every rank."""
    model = GPT(tiny_config)
    first = [torch.chunk(p.detach(), shards, dim=0)[0] for p in model.parameters()]
    assert sizing.weight_bytes(tiny_config, shards) == sum(4 * f.numel() for f in first)
    assert sizing.gradient_bytes(tiny_config, shards) == sum(4 * f.numel() for f in first)
    state = sum(f.size(0) + f.size(1) if f.dim() == 2 else f.numel() for f in first)
    assert sizing.adafactor_state_bytes(tiny_config, shards) == 4 * state
    assert sizing.weight_bytes(tiny_config, 1) == sum(4 * p.numel() for p in model.parameters())


def test_sharding_levels_divide_the_terms_as_the_readme_says():
    plan = Plan.preset("small", world_size=8, batch_size=8, gradient_accumulation_steps=8)  # one micro-batch
    c = plan.config
    whole_w, whole_g = sizing.weight_bytes(c), sizing.gradient_bytes(c)
    ddp = sizing.memory(replace(plan, sharding_level=0))
    assert ddp["weights"] == whole_w and ddp["gradients"] == ddp["ddp_buckets"] == whole_g
    assert ddp["gathered_weights"] == 0
    level2 = sizing.memory(replace(plan, sharding_level=2))
    assert level2["weights"] == sizing.weight_bytes(c, 8) < whole_w / 7
    assert level2["gradients"] == sizing.gradient_bytes(c, 8) and level2["ddp_buckets"] == 0
    assert level2["gathered_weights"] == whole_w // 2  # every weight in bf16, forward to backward
    assert level2["optimizer_state"] == sizing.adafactor_state_bytes(c, 8)
    level3 = sizing.memory(replace(plan, sharding_level=3))
    block = sum(p.numel() for p in meta(c).blocks[0].parameters())
    root = c.padded_vocabulary_size * c.embedding_dimensions + c.embedding_dimensions  # kept gathered
    assert level3["weights"] == level2["weights"] and level3["gathered_weights"] == 2 * (root + 2 * block)
    # Accumulating: FSDP2 keeps whole fp32 gradients between the micro-batches that skip synchronisation.
    accumulating = replace(plan, sharding_level=2, gradient_accumulation_steps=64)
    assert accumulating.micro_batches == 8
    assert sizing.memory(accumulating)["gradients"] == whole_g
    # One process: no sharding, whatever the level.
    single = sizing.memory(replace(plan, world_size=1, sharding_level=3, gradient_accumulation_steps=1))
    assert single["weights"] == whole_w and single["gathered_weights"] == single["ddp_buckets"] == 0


def test_training_memory_is_sizings_weights_gradients_and_state():
    """parallel.training_memory, the scripts' check before building a model, is the same arithmetic."""
    config = Plan.preset("large").config
    for shards in (1, 8):
        device, weights = training_memory(config, shards)
        assert weights == sizing.weight_bytes(config)
        assert device == weights + sizing.gradient_bytes(config, shards) + sizing.adafactor_state_bytes(config, shards)
    assert training_memory(config, 8)[0] < training_memory(config, 1)[0]


# ----------------------------------------------------------------------------- compute and inference


def test_compute_time_and_cost():
    plan = Plan.preset("small", tokens_per_sample=2048)
    model = meta(plan.config)
    one = sizing.compute(plan, 1, "H100", 0.5, price_per_gpu_hour=2.0)
    assert one["training_tokens"] == 20 * model.num_parameters()
    assert one["flops_per_token"] == model.flops_per_token(2048)
    assert one["seconds"] == pytest.approx(one["total_flops"] / (989e12 * 0.5))
    eight = sizing.compute(plan, 8, "H100", 0.5, training_tokens=7e9, price_per_gpu_hour=2.0)
    assert eight["total_flops"] == model.flops_per_token(2048) * 7e9
    assert eight["gpu_hours"] == pytest.approx(8 * eight["seconds"] / 3600)
    assert eight["cost"] == pytest.approx(2.0 * eight["gpu_hours"])
    assert sizing.compute(plan, 8, "A100", 0.5, 7e9)["seconds"] == pytest.approx(eight["seconds"] * 989 / 312)
    with pytest.raises(ValueError, match="unknown GPU"):
        sizing.compute(plan, 1, "TPU")


def test_inference_limits():
    plan = Plan.preset("small")
    model = meta(plan.config)
    out = sizing.inference(plan, 1024, "H200")
    assert out["kv_bytes_per_token"] == model.kv_bytes_per_token(2) == 2 * 24 * 1024 * 2
    assert out["kv_bytes_per_context"] == 1024 * out["kv_bytes_per_token"]
    read = sizing.weight_bytes(plan.config, bytes_per_value=2) + out["kv_bytes_per_context"]
    assert out["batch1_tokens_per_s_limit"] == pytest.approx(4.8e12 / read)
    assert out["max_batch_at_context"] * out["kv_bytes_per_context"] <= 141 * GIB


def test_a_plan_refuses_what_the_scripts_would():
    with pytest.raises(ValueError, match="sharding_level must be 0, 2 or 3"):
        Plan(sharding_level=1)
    with pytest.raises(ValueError, match="divisible by num_attention_heads"):
        Plan(num_attention_heads=7)
    with pytest.raises(ValueError, match="precision"):
        Plan(precision="fp16")


# ----------------------------------------------------------------------------- the notebook and the docs


def test_the_predicted_and_measured_pairs_in_the_notebook_and_docs_are_current():
    """The notebook's and docs/sizing.md's tables of the Small shape on the H200: the measured side is
    docs/performance.md's bench.py figure, the predicted side what sizing.py says now (to 0.1 GiB)."""
    nbformat = pytest.importorskip("nbformat")
    notebook = "\n".join(c.source for c in nbformat.read(NOTEBOOK, as_version=4).cells if c.cell_type == "markdown")
    sizing_page = open(os.path.join(ROOT, "docs", "sizing.md")).read()
    performance = open(os.path.join(ROOT, "docs", "performance.md")).read()
    h200 = performance[performance.index("## Measured on one NVIDIA H200"):]
    for checkpointing, measured in sizing.MEASURED_H200_GIB.items():
        predicted = sizing.memory(sizing.bench_plan(checkpointing))["peak"] / GIB
        assert abs(predicted / measured - 1) < 0.15
        kind = "with" if checkpointing else "without"
        row = f"| {kind} activation checkpointing | {predicted:.1f} GiB | {measured:.1f} GiB |"
        assert row in notebook and row in sizing_page
        assert re.search(rf"\b{measured} GiB", h200)  # bench.py's figure, as docs/performance.md reports it


def test_the_committed_notebook_has_no_outputs():
    nbformat = pytest.importorskip("nbformat")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    for cell in nb.cells:
        if cell.cell_type == "code":
            assert cell.outputs == [] and cell.execution_count is None, cell.source[:60]


@pytest.mark.slow
def test_the_notebook_runs_headless_and_makes_its_tables_and_plots():
    nbformat = pytest.importorskip("nbformat")
    nbclient = pytest.importorskip("nbclient")
    nb = nbformat.read(NOTEBOOK, as_version=4)
    nbclient.NotebookClient(nb, timeout=300, kernel_name="python3", resources={"metadata": {"path": ROOT}}).execute()
    outputs = [o for c in nb.cells if c.cell_type == "code" for o in c.outputs]
    assert not [o for o in outputs if o.output_type == "error"]
    tables = [o.data["text/markdown"] for o in outputs if "text/markdown" in o.get("data", {})]
    images = [o for o in outputs if "image/png" in o.get("data", {})]
    assert len(images) == 2 and len(tables) >= 7
    assert any("| **peak** |" in t for t in tables) and any("XXX-large" in t for t in tables)


def test_momentum_adds_a_first_moment_as_large_as_the_gradients():
    plan = Plan.preset("small", world_size=8, sharding_level=2, momentum=False)
    with_momentum = replace(plan, momentum=True)
    for shards in (1, 8):
        extra = (sizing.adafactor_state_bytes(plan, shards, momentum=True)
                 - sizing.adafactor_state_bytes(plan, shards))
        assert extra == sizing.gradient_bytes(plan, shards)
    assert (sizing.memory(with_momentum)["optimizer_state"] - sizing.memory(plan)["optimizer_state"]
            == sizing.gradient_bytes(plan.trained_config, plan.shards))
    assert training_memory(plan, 1, momentum=True)[0] - training_memory(plan, 1)[0] == sizing.gradient_bytes(plan)
