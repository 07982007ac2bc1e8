import math

import pytest
import torch
import torch.nn.functional as F

from model import GPT, IGNORE_INDEX, GPTConfig


def test_logits_shape_is_the_real_vocabulary(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocabulary_size, (3, 11))
    logits = tiny_model(idx)
    assert logits.shape == (3, 11, tiny_config.vocabulary_size)
    assert tiny_model.token_embeddings.weight.shape[0] == 320  # 300 padded up to a multiple of 64
    assert tiny_config.padded_vocabulary_size % 64 == 0


def test_causal_changing_a_token_leaves_earlier_logits_unchanged(tiny_model, tiny_config):
    tiny_model.eval()
    idx = torch.randint(0, tiny_config.vocabulary_size, (2, 16))
    t = 9
    changed = idx.clone()
    changed[:, t] = (changed[:, t] + 1) % tiny_config.vocabulary_size
    a, b = tiny_model(idx), tiny_model(changed)
    torch.testing.assert_close(a[:, :t], b[:, :t], rtol=0, atol=1e-6)
    assert not torch.allclose(a[:, t:], b[:, t:])


def test_embeddings_are_tied_to_the_output_layer(tiny_model, tiny_config):
    C, V, P = tiny_config.embedding_dimensions, tiny_config.vocabulary_size, tiny_config.padded_vocabulary_size
    vocab_sized = [n for n, p in tiny_model.named_parameters() if P in p.shape]
    assert vocab_sized == ["token_embeddings.weight"]
    # Changing an embedding row changes the logit of that token even at positions that never read it.
    tiny_model.eval()
    idx = torch.zeros(1, 4, dtype=torch.long)
    before = tiny_model(idx)
    with torch.no_grad():
        tiny_model.token_embeddings.weight[5] += 1.0
    after = tiny_model(idx)
    assert not torch.allclose(before[..., 5], after[..., 5])
    torch.testing.assert_close(before[..., 6], after[..., 6])
    # Parameter count: embedding once, 12 C^2 per block at ratio 4, three norms' weights.
    L = tiny_config.num_hidden_layers
    assert tiny_model.num_parameters() == V * C + L * (12 * C * C + 2 * C) + C


def test_loss_equals_reference_cross_entropy_and_ignores_padding(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocabulary_size, (2, 8))
    targets = torch.randint(0, tiny_config.vocabulary_size, (2, 8))
    targets[0, :3] = IGNORE_INDEX
    loss = tiny_model(idx, targets)
    logits = tiny_model(idx)
    keep = targets != IGNORE_INDEX
    expected = F.cross_entropy(logits[keep], targets[keep])
    torch.testing.assert_close(loss, expected)
    # The padded rows of the table can never win a prediction: they are cut before softmax.
    assert logits.argmax(-1).max() < tiny_config.vocabulary_size


@pytest.mark.parametrize("dropout", [0.0, 0.2])
def test_activation_checkpointing_gives_the_same_loss_and_gradients(tiny_config, dropout):
    config = GPTConfig(**{**tiny_config.to_dict(), "dropout": dropout})
    idx = torch.randint(0, config.vocabulary_size, (2, 12))
    results = []
    for enabled in (False, True):
        torch.manual_seed(0)
        model = GPT(config)
        model.set_activation_checkpointing(enabled)
        torch.manual_seed(1)  # same dropout masks in both runs
        loss = model(idx, idx)
        loss.backward()
        results.append((loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters()}))
    (loss_a, grads_a), (loss_b, grads_b) = results
    torch.testing.assert_close(loss_a, loss_b)
    for name in grads_a:
        torch.testing.assert_close(grads_a[name], grads_b[name], msg=name)


def test_residual_projections_start_smaller(tiny_model, tiny_config):
    L = tiny_config.num_hidden_layers
    proj = torch.cat([b.attn.proj.weight.flatten() for b in tiny_model.blocks])
    qkv = torch.cat([b.attn.qkv.weight.flatten() for b in tiny_model.blocks])
    assert proj.std().item() == pytest.approx(0.02 / math.sqrt(2 * L), rel=0.15)
    assert qkv.std().item() == pytest.approx(0.02, rel=0.1)


def test_a_model_trained_on_short_windows_works_at_four_times_their_length(tiny_model, tiny_config):
    """No positional embeddings: nothing ties the model to the 16-token windows it was trained on. A
    position table (clipped or wrapped), a mask built for a fixed size or a hidden attention window
    would each break one of these checks at 64 tokens."""
    V, T = tiny_config.vocabulary_size, 16
    g = torch.Generator().manual_seed(0)
    stream = torch.randperm(V, generator=g)[:7].repeat(20)  # a cycle of 7 tokens, 140 tokens long
    optimizer = torch.optim.AdamW(tiny_model.parameters(), lr=1e-2)
    for _ in range(40):
        starts = torch.randint(0, len(stream) - T, (8,), generator=g).tolist()
        windows = torch.stack([stream[s : s + T + 1] for s in starts])  # (8, T + 1)
        loss = tiny_model(windows[:, :-1], windows[:, 1:])
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
    tiny_model.eval()
    idx = stream[None, 3 : 3 + 4 * T]  # (1, 4T) from another phase of the cycle
    with torch.no_grad():
        logits = tiny_model(idx)[0]  # (4T, V)
        assert torch.isfinite(logits).all()
        loss = F.cross_entropy(logits[:-1], idx[0, 1:], reduction="none")
        assert loss[: T - 1].mean() < 0.5  # it learned the cycle within the trained length...
        assert loss[T:].mean() < loss[: T - 1].mean() + 0.05  # ...and predicts as well past it
        # Every position reads every earlier token and no later one, far past the trained length:
        # changing token t leaves the logits before t as they were and changes every one from t on.
        ts = [0, 5, 21, 40, 4 * T - 2]
        changed = idx.repeat(len(ts), 1)  # (len(ts), 4T), row r with token ts[r] changed
        for r, t in enumerate(ts):
            changed[r, t] = (changed[r, t] + 1) % V
        for t, other in zip(ts, tiny_model(changed)):
            torch.testing.assert_close(other[:t], logits[:t], rtol=0, atol=1e-6)
            assert (other[t:] - logits[t:]).abs().amax(-1).min() > 1e-5, t  # each position from t on moved
        # Nothing depends on the position: every position of a constant sequence gets the same logits.
        constant = tiny_model(torch.full((1, 4 * T), 5))[0]
        torch.testing.assert_close(constant, constant[:1].expand_as(constant), rtol=0, atol=1e-5)


def test_small_default_has_353m_parameters():
    with torch.device("meta"):
        model = GPT(GPTConfig())
    assert 353_000_000 <= model.num_parameters() < 354_000_000  # the model card's 353M


@pytest.mark.parametrize(
    "field, value, message",
    [
        ("feed_forward_ratio", 3, "feed_forward_ratio must be 1, 2 or 4"),
        ("num_attention_heads", 5, "divisible by num_attention_heads"),
        ("dropout", 1.0, "dropout must be in [0, 1)"),
        ("num_hidden_layers", 0, "num_hidden_layers must be positive"),
    ],
)
def test_config_rejects_bad_values(tiny_config, field, value, message):
    with pytest.raises(ValueError, match=message.replace("[", r"\[").replace(")", r"\)")):
        GPTConfig(**{**tiny_config.to_dict(), field: value})


def test_config_round_trips_through_a_dict(tiny_config):
    assert GPTConfig.from_dict(tiny_config.to_dict()) == tiny_config


@pytest.mark.parametrize("chunk_bytes", [2**29, 4 * 64 * 7])  # one chunk; chunks of 7 rows (uneven)
def test_chunked_loss_and_gradients_equal_the_plain_computation(tiny_config, monkeypatch, chunk_bytes):
    import model as model_module

    monkeypatch.setattr(model_module, "LOGITS_CHUNK_BYTES", chunk_bytes)
    x = torch.randn(40, tiny_config.embedding_dimensions, dtype=torch.float64, requires_grad=True)
    weight = torch.randn(tiny_config.padded_vocabulary_size, tiny_config.embedding_dimensions, dtype=torch.float64,
                         requires_grad=True)
    targets = torch.randint(0, tiny_config.vocabulary_size, (40,))
    targets[::5] = IGNORE_INDEX
    loss = model_module.linear_cross_entropy(x, weight, targets, tiny_config.vocabulary_size)
    (loss * 3).backward()
    gx, gw = x.grad.clone(), weight.grad.clone()
    x.grad = weight.grad = None
    # Plain reference: full logits over the real vocabulary only.
    reference = F.cross_entropy(x @ weight[: tiny_config.vocabulary_size].t(), targets, ignore_index=IGNORE_INDEX)
    (reference * 3).backward()
    torch.testing.assert_close(loss, reference)
    torch.testing.assert_close(gx, x.grad)
    torch.testing.assert_close(gw, weight.grad)
    assert gw[tiny_config.vocabulary_size :].abs().max() == 0  # padded rows get no gradient
    with torch.no_grad():  # the evaluation path
        torch.testing.assert_close(model_module.linear_cross_entropy(x, weight, targets, tiny_config.vocabulary_size),
                                   reference)


def test_model_loss_and_gradients_equal_a_reference_on_full_logits(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocabulary_size, (2, 9))
    targets = torch.randint(0, tiny_config.vocabulary_size, (2, 9))
    loss = tiny_model(idx, targets)
    loss.backward()
    grads = {n: p.grad.clone() for n, p in tiny_model.named_parameters()}
    tiny_model.zero_grad()
    reference = F.cross_entropy(tiny_model(idx).reshape(-1, tiny_config.vocabulary_size), targets.reshape(-1))
    reference.backward()
    torch.testing.assert_close(loss, reference)
    for n, p in tiny_model.named_parameters():
        torch.testing.assert_close(grads[n], p.grad, msg=n)


def test_all_targets_ignored_gives_zero_loss(tiny_model, tiny_config):
    idx = torch.randint(0, tiny_config.vocabulary_size, (1, 5))
    loss = tiny_model(idx, torch.full((1, 5), IGNORE_INDEX))
    assert loss.item() == 0.0
    loss.backward()
    assert all(torch.isfinite(p.grad).all() for p in tiny_model.parameters())


@pytest.mark.parametrize("bad", [-1, -7, 300, 319])
def test_out_of_range_targets_are_refused(tiny_model, bad):
    """-1 would be scored as token 0 and a padded id (300..319 here) as an infinite loss."""
    x = torch.randint(0, 300, (1, 8))
    y = x.clone()
    y[0, 3] = bad
    with pytest.raises(RuntimeError, match="targets must be token ids"):
        tiny_model(x, y)
    with torch.no_grad(), pytest.raises(RuntimeError, match="targets must be token ids"):
        tiny_model(x, y)


@pytest.mark.parametrize("shape", [(40, 32), (3, 7, 32)])
def test_the_cpu_rms_norm_equals_torchs_forward_and_backward(shape):
    from model import RMSNorm, _RMSNormFunction

    torch.manual_seed(0)
    norm = RMSNorm(shape[-1])
    with torch.no_grad():
        norm.weight.uniform_(0.5, 1.5)
    x = torch.randn(shape, requires_grad=True)
    grad = torch.randn(shape)
    ours = norm(x)
    assert ours.grad_fn.name().startswith("_RMSNormFunction")  # the hand-written path ran
    theirs = F.rms_norm(x, (shape[-1],), norm.weight, torch.finfo(torch.float32).eps)
    torch.testing.assert_close(ours, theirs)
    for a, b in zip(torch.autograd.grad(ours, (x, norm.weight), grad), torch.autograd.grad(theirs, (x, norm.weight), grad)):
        torch.testing.assert_close(a, b)
    inputs = (torch.randn(shape, dtype=torch.float64, requires_grad=True),
              torch.rand(shape[-1], dtype=torch.float64, requires_grad=True))
    assert torch.autograd.gradcheck(lambda x, w: _RMSNormFunction.apply(x, w, 1e-6), inputs)
    with torch.no_grad():  # inference takes torch's own path
        assert norm(x).grad_fn is None
    norm.weight.requires_grad_(False)  # a frozen norm (LoRA): only the input's gradient
    (frozen,) = torch.autograd.grad(norm(x), x, grad)
    theirs = F.rms_norm(x, (shape[-1],), norm.weight, torch.finfo(torch.float32).eps)
    torch.testing.assert_close(frozen, torch.autograd.grad(theirs, x, grad)[0])


def test_zero_projection_init_starts_every_block_as_the_identity(tiny_config):
    torch.manual_seed(0)
    gpt2 = GPT(tiny_config)
    torch.manual_seed(0)
    zero = GPT(tiny_config, init="zero_proj")
    for (name, a), (_, b) in zip(gpt2.named_parameters(), zero.named_parameters()):
        if name.endswith(("attn.proj.weight", "mlp.down.weight")):
            assert b.abs().max() == 0 and a.abs().max() > 0, name
        else:
            assert torch.equal(a, b), name  # the same draws for everything else
    zero.eval()
    idx = torch.randint(0, tiny_config.vocabulary_size, (2, 9))
    x = zero.output_norm(zero.token_embeddings(idx))  # no block changes the stream
    torch.testing.assert_close(zero(idx), (x @ zero.token_embeddings.weight.t())[..., : tiny_config.vocabulary_size])
    with pytest.raises(ValueError, match="init must be one of"):
        GPT(tiny_config, init="zeros")
