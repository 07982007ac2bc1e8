"""--position_encoding: RoPE and ALiBi as ablations of NoPE. Causality, the KV cache (past the ring's
wrap) against recomputation, chunked prefill, packed documents, NoPE untouched, checkpoints, and
growing the context on --resume."""


import dataclasses

import pytest
import torch
from conftest import fails_with_one_line, tiny_pretrain_args
from helpers import greedy_by_recomputation, greedy_with_cache

import generate
import model as model_module
import pretrain
from beam_search import beam_search
from checkpoint import load_checkpoint, model_from_checkpoint
from common import UserError
from model import GPT, GPTConfig, alibi_slopes

ENCODINGS = ("rope", "alibi", "learned")
DECODED = ("rope", "alibi")  # generate.py, beam_search.py and the engine refuse learned positions


def random_model(position_encoding, heads=4, layers=2, seed=0):
    torch.manual_seed(seed)
    return GPT(GPTConfig(vocabulary_size=300, embedding_dimensions=48, num_attention_heads=heads,
                         num_hidden_layers=layers, dropout=0.0, position_encoding=position_encoding)).eval()


def tokens(n, seed=1):
    return torch.randint(0, 300, (n,), generator=torch.Generator().manual_seed(seed))


# ----------------------------------------------------------------------------- config


def test_config_validates_the_encoding():
    with pytest.raises(ValueError, match="position_encoding must be one of none, rope, alibi, learned, got 'xpos'"):
        GPTConfig(position_encoding="xpos")
    with pytest.raises(ValueError, match="rope needs an even head width"):
        GPTConfig(embedding_dimensions=12, num_attention_heads=4, position_encoding="rope")
    assert GPTConfig.from_dict({"vocabulary_size": 300}).position_encoding == "none"  # an old checkpoint's config


def test_alibi_slopes_follow_the_paper():
    assert alibi_slopes(8, "cpu").tolist() == [2.0 ** -k for k in range(1, 9)]
    # 6 heads: the 4-head slopes, then every other slope of 8 heads (2^-0.5, 2^-1.5)
    expected = [2.0 ** -2, 2.0 ** -4, 2.0 ** -6, 2.0 ** -8, 2.0 ** -1, 2.0 ** -3]
    torch.testing.assert_close(alibi_slopes(6, "cpu"), torch.tensor(expected))


# ----------------------------------------------------------------------------- NoPE untouched

# Computed with the model code before position_encoding existed (torch 2.13 on the CPU, one thread): the
# first logit of every position of a seeded tiny model, plain, packed, and decoded through a 5-slot ring.
NOPE_LOGITS = [
    [-0.22759461402893066, -0.08745764195919037, 0.020599601790308952, -0.10263271629810333, 0.013511601835489273,
     -0.10140933841466904, 0.031169503927230835, -0.04626685380935669, -0.17565295100212097, 0.04798642173409462,
     0.14639487862586975, 0.109571672976017],
    [-0.05678236484527588, -0.13933327794075012, 0.07602139562368393, 0.02878621779382229, -0.0655282735824585,
     0.0689866915345192, 0.019329950213432312, 0.03755554184317589, -0.02043987065553665, 0.017747564241290092,
     0.06248417869210243, 0.17244483530521393]]
NOPE_PACKED = [
    [-0.22759461402893066, -0.08745764195919037, 0.020599601790308952, -0.10263271629810333, 0.013511601835489273,
     -0.0898718610405922, 0.036214206367731094, -0.0447731576859951, -0.17754949629306793, 0.05464326962828636,
     0.15230748057365417, 0.11751134693622589],
    NOPE_LOGITS[1]]
NOPE_DECODED = [
    [0.020599601790308952, -0.10263271629810333, 0.013511594384908676, -0.09503848850727081, 0.032918646931648254,
     -0.047364797443151474, -0.17465275526046753, 0.05366484075784683, 0.15434305369853973, 0.12316133826971054],
    [0.07602139562368393, 0.028786228969693184, -0.0655282735824585, 0.07045941054821014, 0.016794845461845398,
     0.04516363888978958, -0.020950736477971077, 0.017718538641929626, 0.07010381668806076, 0.19464322924613953]]
NOPE_LOSS = 5.713575839996338


def nope_outputs():
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocabulary_size=300, embedding_dimensions=32, num_attention_heads=4, num_hidden_layers=2,
                      dropout=0.0)).eval()
    idx = torch.randint(0, 300, (2, 12), generator=torch.Generator().manual_seed(3))
    with torch.no_grad():
        logits, loss = m(idx), m(idx, targets=idx.roll(-1, 1))
        packed = m(idx, documents=torch.tensor([[0] * 5 + [1] * 7, [0] * 12]))
        m.setup_cache(2, 5)
        decoded = [m(idx[:, :3], input_pos=torch.arange(3))[:, -1, 0]]
        decoded += [m(idx[:, t : t + 1], input_pos=torch.tensor([t]))[:, -1, 0] for t in range(3, 12)]
    return logits[:, :, 0], loss, packed[:, :, 0], torch.stack(decoded, 1)


def test_nope_is_unchanged_from_before():
    """The recorded values to within rounding: they were recorded on another machine, and another vector
    kernel (AVX-512, AVX2 or none: ATEN_CPU_CAPABILITY) rounds differently in the last bit (1.9e-8 seen).
    A change to the NoPE path itself would move them by far more than these tolerances allow."""
    logits, loss, packed, decoded = nope_outputs()
    recorded = dict(rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(logits, torch.tensor(NOPE_LOGITS), **recorded)
    torch.testing.assert_close(packed, torch.tensor(NOPE_PACKED), **recorded)
    torch.testing.assert_close(decoded, torch.tensor(NOPE_DECODED), **recorded)
    assert loss.item() == pytest.approx(NOPE_LOSS, rel=1e-6)


def test_nope_never_computes_positions(monkeypatch):
    """The NoPE path takes none of the new branches (a check that holds on any BLAS)."""
    def never(*args, **kwargs):
        raise AssertionError("NoPE computed positions")
    for name in ("rope_angles", "apply_rope", "alibi_slopes", "alibi_mask", "document_positions"):
        monkeypatch.setattr(model_module, name, never)
    monkeypatch.setattr(GPT, "_positions", never)
    nope_outputs()


# ----------------------------------------------------------------------------- behaviour


def test_learned_positions_are_gpt2s_and_stop_at_their_length():
    """learned adds a trained vector per absolute position to the token's (GPT-2's wpe): the first block sees
    token + position embeddings, and no call, prefill or cache may go past max_position_embeddings."""
    torch.manual_seed(0)
    m = GPT(GPTConfig(vocabulary_size=300, embedding_dimensions=48, num_attention_heads=4, num_hidden_layers=2,
                      dropout=0.0, position_encoding="learned", max_position_embeddings=8)).eval()
    seen = []
    m.blocks[0].register_forward_pre_hook(lambda module, inputs: seen.append(inputs[0]))
    ids = tokens(8)[None]
    with torch.no_grad():
        m(ids)
    expected = m.token_embeddings.weight[ids[0]] + m.position_embeddings.weight[:8]
    torch.testing.assert_close(seen[0][0], expected, rtol=0, atol=0)
    assert m.num_parameters() - m.num_parameters(include_embeddings=False) == (300 + 8) * 48
    with pytest.raises(ValueError, match="learned positions stop at 8 tokens"):
        m(tokens(9)[None])
    with pytest.raises(ValueError, match="learned positions stop at 8 tokens"):
        m.setup_cache(1, 9)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_causal(encoding):
    """Changing token t leaves the logits before t unchanged, and changes those from t on."""
    m = random_model(encoding)
    a = tokens(16)[None]
    b = a.clone()
    b[0, 9] = (b[0, 9] + 1) % 300
    with torch.no_grad():
        la, lb = m(a), m(b)
    torch.testing.assert_close(la[:, :9], lb[:, :9], rtol=0, atol=0)
    assert not torch.allclose(la[:, 9:], lb[:, 9:])


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_positions_matter(encoding):
    """The encoding changes what the model computes: the same weights without it (NoPE) give other logits for
    the same tokens, by far more than rounding. (A repeated token cannot show it: every position's values
    are then the same, so attention returns them whatever its weights, and only rounding differs.)"""
    m = random_model(encoding)
    nope = GPT(dataclasses.replace(m.config, position_encoding="none")).eval()
    nope.load_state_dict({k: v for k, v in m.state_dict().items() if not k.startswith("position_embeddings")})
    x = tokens(16)[None]
    with torch.no_grad():
        differences = (m(x) - nope(x)).abs().amax(dim=-1)[0]  # (16,): per position
    assert differences[0] < 1e-5 or encoding == "learned"  # the first token sits at distance 0 from itself only
    assert differences[1:].min() > 1e-4  # (rounding differs by about 1e-7; RoPE at random init by 5e-4 and more)


@pytest.mark.parametrize("encoding", DECODED)
@pytest.mark.parametrize("prompt_length, context_length, steps", [(5, 8, 30), (20, 8, 20), (3, 64, 20)])
def test_cached_greedy_equals_recomputation_past_the_window(encoding, prompt_length, context_length, steps):
    """The ring wraps (an 8-slot cache, 30+ tokens): keys keep their absolute positions, so the cached
    decode equals sliding-window recomputation; a prompt longer than the ring takes the windowed prefill."""
    m = random_model(encoding, layers=3)
    prompt = tokens(prompt_length).tolist()
    assert (greedy_with_cache(m, prompt, steps, context_length)
            == greedy_by_recomputation(m, prompt, steps, context_length))


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_cached_logits_equal_windowed_logits(encoding):
    """Logits, not only argmaxes: every decode step of a 6-slot ring against the windowed full forward."""
    m = random_model(encoding)
    seq = tokens(20)[None]
    with torch.no_grad():
        full = m(seq, window=6)
        m.setup_cache(1, 6)
        m(seq[:, :4], input_pos=torch.arange(4))
        steps = [m(seq[:, t : t + 1], input_pos=torch.tensor([t]))[0, 0] for t in range(4, 20)]
    torch.testing.assert_close(torch.stack(steps), full[0, 4:], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_chunked_prefill_equals_one_shot(encoding):
    """A prompt fed in chunks that continue the ring (up to the cache length each) gives the logits of one
    prefill, then the same decode step."""
    m = random_model(encoding)
    seq = tokens(24)[None]
    with torch.no_grad():
        m.setup_cache(1, 32)
        one_shot = m(seq, input_pos=torch.arange(24))
        step_one = m(seq[:, :1], input_pos=torch.tensor([24]))
        m.setup_cache(1, 32)
        chunks = [m(seq[:, a:b], input_pos=torch.arange(a, b)) for a, b in ((0, 10), (10, 17), (17, 24))]
        step_chunks = m(seq[:, :1], input_pos=torch.tensor([24]))
    torch.testing.assert_close(torch.cat(chunks, 1), one_shot, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(step_chunks, step_one, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_chunked_prefill_past_the_ring_equals_the_window(encoding):
    """Chunks that overflow an 8-slot ring: each continues from the ring's last 8 keys (sliding window)."""
    m = random_model(encoding)
    seq = tokens(20)[None]
    with torch.no_grad():
        full = m(seq, window=8)
        m.setup_cache(1, 8)
        chunks = [m(seq[:, a:b], input_pos=torch.arange(a, b)) for a, b in ((0, 6), (6, 12), (12, 20))]
    torch.testing.assert_close(torch.cat(chunks, 1), full, rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_packed_documents_equal_separate_runs(encoding):
    """Positions restart at every document (RoPE), distances stay within one (ALiBi): a packed row
    computes what each document computes alone, and the loss matches too."""
    m = random_model(encoding)
    docs = [tokens(5, 1), tokens(8, 2), tokens(3, 3)]
    row = torch.cat(docs)[None]
    documents = torch.cat([torch.full((len(d),), i) for i, d in enumerate(docs)])[None]
    other = tokens(16, 4)[None]  # a second row of one document: the batch dimension of the positions
    with torch.no_grad():
        packed = m(torch.cat([row, other]), documents=torch.cat([documents, torch.zeros_like(documents)]))
        alone = torch.cat([m(d[None])[0] for d in docs])
    torch.testing.assert_close(packed[0], alone, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(packed[1], m(other)[0], rtol=1e-4, atol=1e-5)


@pytest.mark.parametrize("encoding", ENCODINGS)
def test_training_step_with_autocast_and_checkpointing(encoding):
    """Gradients flow through the encodings, with bf16 autocast (ALiBi's float mask in the query dtype)
    and activation checkpointing."""
    m = random_model(encoding).train()
    m.set_activation_checkpointing(True)
    seq = tokens(17)[None]
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = m(seq[:, :-1], targets=seq[:, 1:])
    loss.backward()
    assert torch.isfinite(loss) and all(p.grad is not None for p in m.parameters())


def test_non_power_of_two_heads_decode_like_recomputation():
    m = random_model("alibi", heads=6)
    prompt = tokens(4).tolist()
    assert greedy_with_cache(m, prompt, 20, 8) == greedy_by_recomputation(m, prompt, 20, 8)


@pytest.mark.parametrize("encoding", DECODED)
def test_beam_width_one_is_greedy_past_the_window(encoding):
    """Beam search reorders the ring's rows; the positions are shared by every beam."""
    m = random_model(encoding)
    prompt = [1, 2, 3]
    found = beam_search(m, prompt, end=299, beam_width=1, num_candidates=1, max_tokens=20, context_length=8)[0]
    assert found.tokens == greedy_by_recomputation(m, prompt, 20, window=8)


@pytest.mark.parametrize("encoding", DECODED)
def test_beam_search_scores_equal_recomputed_log_probabilities(encoding):
    m = random_model(encoding)
    prompt = [4, 1, 7]
    for found in beam_search(m, prompt, end=299, beam_width=4, num_candidates=3, max_tokens=6, context_length=16):
        with torch.no_grad():
            logp = torch.log_softmax(m(torch.tensor([prompt + found.tokens]))[0].float(), -1)
        total = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(found.tokens))
        assert found.score == pytest.approx(total / len(found.tokens), abs=1e-4)


@pytest.mark.slow  # torch.compile of the decode step: inductor builds C++ kernels
@pytest.mark.parametrize("encoding", DECODED)
def test_compiled_decode_step_equals_recomputation(encoding):
    """The decode step a GPU runs as a CUDA graph: positions come in as a tensor, through three spans
    (64, 128, 130) and past the wrap."""
    m = random_model(encoding)
    prompt = [5, 6, 7]
    assert greedy_with_cache(m, prompt, 140, 130, use_compile=True) == greedy_by_recomputation(m, prompt, 140, 130)


# ----------------------------------------------------------------------------- scripts and checkpoints


def test_bad_value_is_one_line(capsys, builtin_data, tmp_path):
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--position_encoding", "xpos")
    fails_with_one_line(capsys, pretrain, argv, "--position_encoding", "rope")


def test_learned_positions_past_their_length_are_one_line(capsys, builtin_data, tmp_path):
    """Training samples longer than the positions, and decoding (a ring cache runs past any fixed number of
    positions), are refused in one line, not an index error mid-run."""
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--position_encoding", "learned",
                              "--max_position_embeddings", "16")  # the tiny run's samples are 32 tokens
    fails_with_one_line(capsys, pretrain, argv, "--tokens_per_sample 32", "learned positions stop at 16 tokens")
    with pytest.raises(UserError, match="learned positions .* decoding serves NoPE, RoPE and ALiBi models"):
        greedy_with_cache(random_model("learned"), tokens(4).tolist(), 3, 8)


def test_rope_with_an_odd_head_width_is_one_line(capsys, builtin_data, tmp_path):
    argv = tiny_pretrain_args(builtin_data, str(tmp_path), "--position_encoding", "rope",
                              "--embedding_dimensions", "36", "--num_attention_heads", "4")
    fails_with_one_line(capsys, pretrain, argv, "rope needs an even head width")


@pytest.fixture(scope="module")
def trained_rope(builtin_data, tmp_path_factory):
    path = tmp_path_factory.mktemp("rope")
    pretrain.main(pretrain.parse_args(tiny_pretrain_args(builtin_data, str(path), "--num_epochs", "2",
                                                         "--position_encoding", "rope")))
    return path / "checkpoint.pt"


def test_the_checkpoint_records_the_encoding_and_generation_uses_it(trained_rope, tmp_path, capsys):
    state = load_checkpoint(str(trained_rope), "pretrain")
    assert state["config"]["position_encoding"] == "rope"
    assert model_from_checkpoint(state).config.position_encoding == "rope"
    capsys.readouterr()
    generate.main(generate.parse_args(["--checkpoint_path", str(trained_rope), "--device", "cpu", "--prompt", "ab",
                                       "--max_tokens", "5", "--temperature", "0"]))
    assert capsys.readouterr().out


def test_an_old_checkpoint_without_the_field_loads_as_nope(trained_rope, tmp_path):
    state = torch.load(trained_rope, weights_only=True)
    state.pop("sha256", None)
    del state["config"]["position_encoding"]  # as LightGPT wrote it before the option existed
    torch.save(state, tmp_path / "old.pt")
    old = load_checkpoint(str(tmp_path / "old.pt"), "pretrain")
    assert model_from_checkpoint(old).config.position_encoding == "none"


def test_a_bad_encoding_in_a_checkpoint_is_named(trained_rope, tmp_path, capsys):
    for value, words in ((1, "its config's 'position_encoding' is 1, expected a string"),
                         ("xpos", "position_encoding must be one of none, rope, alibi, learned, got 'xpos'")):
        state = torch.load(trained_rope, weights_only=True)
        state.pop("sha256", None)
        state["config"]["position_encoding"] = value
        torch.save(state, tmp_path / "bad.pt")
        argv = ["--checkpoint_path", str(tmp_path / "bad.pt"), "--device", "cpu", "--prompt", "x"]
        fails_with_one_line(capsys, generate, argv, words)


def test_growing_the_context_on_resume(builtin_data, tmp_path, capsys):
    """Two epochs at 16 tokens, then two more at 32 with --resume: weights, optimizer and step carry over
    and the run says it now draws windows of the new length."""
    def argv(epochs, length):
        return tiny_pretrain_args(builtin_data, str(tmp_path), "--num_epochs", epochs, "--tokens_per_sample", length,
                                  "--position_encoding", "alibi")
    pretrain.main(pretrain.parse_args(argv("2", "16")))
    first = load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")
    assert first["args"]["tokens_per_sample"] == 16 and first["step"] == 4
    capsys.readouterr()
    history = pretrain.main(pretrain.parse_args(argv("4", "32") + ["--resume"]))
    out = capsys.readouterr().out
    assert ("note: resuming at --tokens_per_sample 32 (the checkpoint trained at 16): samples are drawn afresh "
            "at the new length") in out
    second = load_checkpoint(str(tmp_path / "checkpoint.pt"), "pretrain")
    assert second["step"] == 8 and second["args"]["tokens_per_sample"] == 32
    assert second["config"]["position_encoding"] == "alibi"
    assert history and all(torch.isfinite(torch.tensor(loss)) for _, loss in history)
    assert not torch.equal(first["model"]["blocks.0.attn.qkv.weight"], second["model"]["blocks.0.attn.qkv.weight"])
