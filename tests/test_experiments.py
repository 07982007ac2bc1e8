"""experiments/nope_levers.py: each variant line trains what it says and is scored by the one evaluation."""

import importlib.util
import json
import math
import os
import sys
from pathlib import Path

import pytest
import torch
from conftest import ROOT


def levers():
    spec = importlib.util.spec_from_file_location("nope_levers", os.path.join(ROOT, "experiments", "nope_levers.py"))
    module = importlib.util.module_from_spec(spec)
    sys.modules["nope_levers"] = module  # dataclasses and the worker processes look it up there
    spec.loader.exec_module(module)
    return module


def test_variants_parse_into_the_model_and_the_training_they_name():
    m = levers()
    name, config, t = m.parse_variant("deep: num_hidden_layers=8, embedding_dimensions=96 lr=1e-2 start_token=1",
                                      m.Training())
    assert name == "deep" and (config.num_hidden_layers, config.embedding_dimensions) == (8, 96)
    assert (config.num_attention_heads, config.dropout, config.position_encoding) == (4, 0.0, "none")  # the recipe
    assert (t.lr, t.start_token, t.steps, t.batch, t.window) == (1e-2, 1, 2000, 12, 64)
    _, learned, _ = m.parse_variant("l: position_encoding=learned", m.Training(window=32))
    assert learned.max_position_embeddings == 32  # as nanoGPT's block_size
    with pytest.raises(SystemExit, match="unknown key 'depth'"):
        m.parse_variant("bad: depth=8", m.Training())


@pytest.mark.slow  # trains three tiny models in a worker process
def test_a_short_run_scores_every_variant_at_every_length(tmp_path):
    m = levers()
    out = tmp_path / "out"
    results = m.main(["--steps", "3", "--jobs", "1", "--eval_windows", "4", "--dataset_path", str(tmp_path / "data"),
                      "--output_path", str(out), "nope", "learned: position_encoding=learned",
                      "levers: start_token=1 init=zero_proj qk_norm=1 head_temperature=1"])
    assert [r["name"] for r in results] == ["nope", "learned", "levers"]
    nope, learned, lever = results
    assert all(4.0 < nope["losses"][L] < 6.5 for L in (64, 256))  # about ln(257) = 5.55 after 3 steps
    assert learned["losses"][64] > 0 and math.isnan(learned["losses"][256])  # its positions stop at 64
    assert lever["parameters"] > nope["parameters"]  # the norms' gains and the temperatures train too
    assert all(r["sample"].startswith("The class statement") for r in results)
    assert len(json.loads((out / "results.json").read_text())) == 3


@pytest.mark.slow  # about 6 s: it times training steps of two models
def test_the_step_comparison_times_pretrains_default_step(tmp_path, capsys):
    """experiments/step_vs_nanogpt.py against a stand-in for nanoGPT's model.py (the real one is not ours)."""
    (tmp_path / "model.py").write_text(
        "import torch\n"
        "from dataclasses import dataclass\n"
        "@dataclass\n"
        "class GPTConfig:\n"
        "    block_size: int; vocab_size: int; n_layer: int; n_head: int; n_embd: int; dropout: float; bias: bool\n"
        "class GPT(torch.nn.Module):\n"
        "    def __init__(self, c):\n"
        "        super().__init__(); self.e = torch.nn.Embedding(c.vocab_size, c.n_embd)\n"
        "    def forward(self, x, y):\n"
        "        logits = self.e(x) @ self.e.weight.t()\n"
        "        return logits, torch.nn.functional.cross_entropy(logits.flatten(0, 1), y.flatten())\n"
        "    def configure_optimizers(self, wd, lr, betas, device):\n"
        "        return torch.optim.AdamW(self.parameters(), lr=lr, betas=betas, weight_decay=wd)\n")
    spec = importlib.util.spec_from_file_location("step_vs_nanogpt", os.path.join(ROOT, "experiments", "step_vs_nanogpt.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    model, optimizer, _ = module.lightgpt()
    assert optimizer.param_groups[0]["beta1"] == 0.9 and model.blocks[0].attn.proj.weight.abs().max() == 0
    module.main(["--nanogpt_path", str(tmp_path), "--steps", "2"])
    out = capsys.readouterr().out
    assert "nanoGPT: " in out and "LightGPT: " in out and "LightGPT / nanoGPT step time: " in out
    # Another copy of model.py, stepped beside them: here one whose norm is LayerNorm.
    edited = Path(ROOT, "model.py").read_text().replace(
        "return _RMSNormFunction.apply(x, self.weight, eps)", "return F.layer_norm(x, x.shape[-1:], self.weight, None, eps)")
    assert "F.layer_norm(x, x.shape" in edited
    (tmp_path / "layernorm.py").write_text(edited)
    module.main(["--nanogpt_path", str(tmp_path), "--steps", "2", "--also", f"layernorm={tmp_path / 'layernorm.py'}"])
    out = capsys.readouterr().out
    assert "layernorm: " in out and "layernorm / nanoGPT step time: " in out
    _, other = module.model_file(f"layernorm={tmp_path / 'layernorm.py'}")
    model, _, _ = module.lightgpt(0.9, other)  # the edited copy's model, not model.py's
    assert "LayerNorm" in model.blocks[0].attn_norm(torch.randn(2, 3, 128, requires_grad=True)).grad_fn.name()
    with pytest.raises(SystemExit, match="--also"):
        module.main(["--nanogpt_path", str(tmp_path), "--also", "nofile"])
