"""LoRA and packed sequences in model.py: identity at initialisation, merging, the grown vocabulary,
block-diagonal attention over packed conversations."""

import pytest
import torch
from helpers import NEW, V, adapted, perturb, tiny

from lora import GrownEmbedding, LoRALinear, lora_parameters, lora_state_dict, merge_lora
from model import GPT, IGNORE_INDEX


def test_adapted_model_at_initialisation_computes_what_the_base_does():
    base = tiny()
    model = adapted(tiny())  # the same seed: the same base weights
    x = torch.randint(0, V, (2, 16))
    logits = model(x)
    assert logits.shape == (2, 16, V + NEW)
    torch.testing.assert_close(logits[..., :V], base(x), rtol=0, atol=0)
    # and the loss on base-vocabulary targets differs only through the new tokens' share of the softmax
    assert torch.isfinite(model(x, x)).all()


def test_only_adapters_and_new_rows_train_and_their_count_is_the_formula():
    model = adapted(tiny(), rank=4)
    trainable = {n: p.numel() for n, p in model.named_parameters() if p.requires_grad}
    assert set(trainable) == {"token_embeddings.new"} | {
        f"blocks.{i}.{t}.lora_{ab}" for i in range(2) for t in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")
        for ab in "ab"}
    assert sum(trainable.values()) == lora_parameters(model.config, 4) + NEW * 32
    assert set(lora_state_dict(model)) == set(trainable)
    # a training step moves nothing frozen
    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    perturb(model)
    model.train()
    x = torch.randint(0, V + NEW, (2, 12))
    model(x, x).backward()
    assert all(p.grad is None for n, p in model.named_parameters() if not p.requires_grad)
    assert all(p.grad is not None and p.grad.abs().sum() > 0 for p in model.parameters() if p.requires_grad)
    assert all(torch.equal(frozen[n], p) for n, p in model.named_parameters() if n in frozen)


def test_new_rows_start_at_the_mean_row_and_stay_tied_to_the_output_layer():
    base = tiny()
    model = adapted(tiny())
    table = base.token_embeddings.weight[:V]
    torch.testing.assert_close(model.token_embeddings.new, table.mean(0).expand(NEW, -1))
    with torch.no_grad():
        model.token_embeddings.new[1] = 5.0
    # the row feeds both the input embedding and the output layer's logit of that id
    assert torch.equal(model.token_embeddings(torch.tensor([V + 1]))[0], torch.full((32,), 5.0))
    h = torch.ones(32)
    assert torch.equal(model.token_embeddings.weight[V + 1] @ h, torch.tensor(5.0 * 32))


def test_merging_the_adapters_leaves_the_outputs_unchanged():
    model = adapted(tiny(), rank=4, alpha=8.0, dropout=0.3)
    perturb(model)
    model.eval()  # dropout off: merged weights compute the adapted model's inference
    x = torch.randint(0, V + NEW, (2, 20))
    before_logits, before_loss = model(x), model(x, x)
    merged = merge_lora(model)
    assert not any(isinstance(m, (LoRALinear, GrownEmbedding)) for m in merged.modules())
    assert type(merged.token_embeddings) is torch.nn.Embedding
    torch.testing.assert_close(merged(x), before_logits, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(merged(x, x), before_loss, rtol=1e-5, atol=1e-5)
    # a plain GPT again: its state loads into a fresh model of the grown config
    fresh = GPT(merged.config)
    fresh.load_state_dict(merged.state_dict())
    torch.testing.assert_close(fresh.eval()(x), before_logits, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("dtype", [torch.float64, torch.bfloat16])
def test_adapters_take_the_bases_dtype_and_merge_into_it(dtype):
    """A bf16 or fp64 model gets adapters of its own dtype (an fp32 adapter's product with a bf16 input
    raised "expected m1 and m2 to have the same dtype"), trains, and merges into layers of that dtype."""
    model = adapted(tiny().to(dtype), rank=4, alpha=8.0)
    assert {p.dtype for p in model.parameters()} == {dtype}
    reference = adapted(tiny(), rank=4, alpha=8.0)  # the same seed draws the same adapters at every dtype
    torch.testing.assert_close(model.blocks[0].attn.qkv.lora_a.float(), reference.blocks[0].attn.qkv.lora_a,
                               rtol=1e-2, atol=1e-2)
    perturb(model)
    x = torch.randint(0, V + NEW, (2, 12))
    model.train()
    model(x, x).backward()
    assert all(p.grad is not None and p.grad.dtype == dtype for p in model.parameters() if p.requires_grad)
    model.eval()
    with torch.no_grad():
        before = model(x)
        merged = merge_lora(model)
        assert {p.dtype for p in merged.parameters()} == {dtype}
        tolerance = 1e-10 if dtype == torch.float64 else 5e-2
        torch.testing.assert_close(merged(x), before, rtol=tolerance, atol=tolerance)


def test_lora_update_is_scaled_by_alpha_over_rank():
    torch.manual_seed(0)
    linear = torch.nn.Linear(8, 6, bias=False)
    layer = LoRALinear(linear, rank=2, alpha=3.0, dropout=0.0)
    with torch.no_grad():
        layer.lora_b.normal_()
    x = torch.randn(5, 8)
    expected = linear(x) + 1.5 * x @ layer.lora_a.t() @ layer.lora_b.t()
    torch.testing.assert_close(layer(x), expected)


@pytest.mark.parametrize("lengths", [(5, 7), (1, 3, 4, 2), (12,)])
def test_packed_conversations_equal_separate_runs(lengths):
    """Rows holding several documents, each attending only to itself, give each document's logits and
    loss exactly as running it alone does (NoPE: nothing about position needs correcting)."""
    model = adapted(tiny())
    perturb(model)
    model.eval()
    torch.manual_seed(3)
    docs = [torch.randint(0, V + NEW, (n + 1,)) for n in lengths]  # n inputs, n targets each
    T = 14
    pad = V + 2
    inputs = torch.full((1, T), pad)
    targets = torch.full((1, T), IGNORE_INDEX)
    documents = torch.full((1, T), len(docs))  # padding: a document of its own
    at = 0
    for i, d in enumerate(docs):
        n = len(d) - 1
        inputs[0, at : at + n], targets[0, at : at + n], documents[0, at : at + n] = d[:-1], d[1:], i
        at += n
    packed = model(inputs, documents=documents)
    at, total, count = 0, 0.0, 0
    for d in docs:
        n = len(d) - 1
        alone = model(d[None, :-1])
        torch.testing.assert_close(packed[0, at : at + n], alone[0], rtol=1e-5, atol=1e-5)
        total += model(d[None, :-1], d[None, 1:]).item() * n
        count += n
        at += n
    torch.testing.assert_close(model(inputs, targets, documents), torch.tensor(total / count), rtol=1e-5, atol=1e-6)
    # without the document mask the later documents see the earlier ones and their logits change
    if len(docs) > 1:
        assert not torch.allclose(model(inputs)[0, lengths[0]], packed[0, lengths[0]], atol=1e-4)


def test_packed_rows_train_through_activation_checkpointing_alike():
    model = adapted(tiny(dropout=0.0))
    perturb(model)
    model.train()
    x = torch.randint(0, V + NEW, (2, 10))
    documents = torch.tensor([[0] * 4 + [1] * 6, [0] * 10])
    grads = []
    for checkpointing in (False, True):
        model.set_activation_checkpointing(checkpointing)
        model.zero_grad()
        model(x, x, documents).backward()
        grads.append([p.grad.clone() for p in model.parameters() if p.requires_grad])
    for a, b in zip(*grads):
        torch.testing.assert_close(a, b)


def test_lora_checkpoint_round_trip(tmp_path):
    """Adapters saved as instruction-tune.py saves them load back onto the same base and compute the same
    logits; the checkpoint holds no base weight."""
    from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
    from lora import adapted_model

    base_model = tiny()
    save_checkpoint({"kind": "pretrain", "config": base_model.config.to_dict(), "model": base_model.state_dict(),
                     "token_encoding": "bytes", "eot_id": 256}, str(tmp_path / "base.pt"))
    base = load_checkpoint(str(tmp_path / "base.pt"), "pretrain")
    model = adapted(tiny(), rank=4, alpha=2.0, dropout=0.1)
    perturb(model)
    save_checkpoint({"kind": "lora", "config": model.config.to_dict(), "adapters": lora_state_dict(model),
                     "lora": {"rank": 4, "alpha": 2.0, "dropout": 0.1},
                     "base": {"sha256": base["sha256"], "vocabulary_size": V},
                     "special_tokens": ["<|im_start|>", "<|im_end|>", "<|pad|>"], "token_encoding": "bytes",
                     "eot_id": 256}, str(tmp_path / "lora.pt"))
    lora = load_checkpoint(str(tmp_path / "lora.pt"), "lora")
    assert not any(k.endswith(".weight") or k == "token_embeddings.base" for k in lora["adapters"])
    loaded = adapted_model(model_from_checkpoint(base), lora).eval()
    x = torch.randint(0, V + NEW, (2, 12))
    torch.testing.assert_close(loaded(x), model.eval()(x), rtol=0, atol=0)
    assert loaded.blocks[0].mlp.up.dropout.p == 0.1 and loaded.config.dropout == 0.0
