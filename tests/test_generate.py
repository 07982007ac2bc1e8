import io
import itertools
import subprocess
import sys

import pytest
import torch

import beam_search
import generate
import pretrain
from beam_search import beam_search as search
from common import run_main
from conftest import ROOT, fails_with_one_line
from data import load_encoding
from generate import Sampling, sample
from helpers import greedy_by_recomputation, greedy_decoder, greedy_with_cache
from model import GPT, GPTConfig


def random_model(vocabulary_size=300, layers=2, seed=0, scale=1.0):
    torch.manual_seed(seed)
    model = GPT(GPTConfig(vocabulary_size=vocabulary_size, embedding_dimensions=32, num_attention_heads=4,
                          num_hidden_layers=layers, dropout=0.0)).eval()
    with torch.no_grad():
        model.token_embeddings.weight.mul_(scale)  # sharper distributions for tiny vocabularies
    return model


# ----------------------------------------------------------------------------- KV cache


@pytest.mark.parametrize("prompt_length, context_length, steps", [(5, 8, 30), (3, 64, 30), (20, 8, 30), (5, 130, 150)])
def test_cached_greedy_equals_recomputation_past_the_window(prompt_length, context_length, steps):
    """Past an 8-token window the ring wraps several times; with 130 slots the decode steps attend over
    spans of 64, 128 and 130 slots before it wraps."""
    model = random_model(layers=3)
    prompt = torch.randint(0, 300, (prompt_length,), generator=torch.Generator().manual_seed(1)).tolist()
    assert (greedy_with_cache(model, prompt, steps, context_length)
            == greedy_by_recomputation(model, prompt, steps, context_length))


@pytest.mark.slow  # torch.compile of the decode step: inductor builds C++ kernels
def test_compiled_decode_step_equals_recomputation():
    """The decode step torch.compile turns into a CUDA graph on GPUs, compiled here for the CPU, through
    three spans (64, 128, 130: the span becomes a dynamic size) and past the point where the ring wraps."""
    model = random_model()
    prompt = [5, 6, 7]
    compiled = greedy_with_cache(model, prompt, 140, 130, use_compile=True)
    assert compiled == greedy_by_recomputation(model, prompt, 140, 130)


def test_cached_logits_equal_recomputed_logits():
    model = random_model()
    seq = torch.randint(0, 300, (1, 20), generator=torch.Generator().manual_seed(2))
    model.setup_cache(1, 6)
    with torch.no_grad():
        model(seq[:, :4], input_pos=torch.arange(4))
        for t in range(4, 20):
            cached = model(seq[:, t : t + 1], input_pos=torch.tensor([t]))[0, -1]
            full = model(seq[:, : t + 1], window=6)[0, -1]
            torch.testing.assert_close(cached, full, rtol=1e-4, atol=1e-5)


def test_a_one_token_prompt_after_a_longer_one_starts_fresh():
    model = random_model()
    decoder = greedy_decoder(model, 16)
    with torch.inference_mode():
        decoder.prefill(torch.tensor([[1, 2, 3, 4, 5, 6]]))
        after = decoder.prefill(torch.tensor([[7]]))
        torch.testing.assert_close(after, model(torch.tensor([[7]]))[:, -1])


def test_a_one_token_call_at_position_zero_starts_a_new_sequence():
    """The model's own API, not only the decoder, forgets the previous sequence's keys."""
    model = random_model()
    model.setup_cache(1, 16)
    with torch.no_grad():
        model(torch.tensor([[1, 2, 3, 4, 5, 6]]), input_pos=torch.arange(6))
        model(torch.tensor([[9]]), input_pos=torch.tensor([6]))
        fresh = model(torch.tensor([[7]]), input_pos=torch.tensor([0]))[:, -1]
        torch.testing.assert_close(fresh, model(torch.tensor([[7]]))[:, -1])
        following = model(torch.tensor([[8]]), input_pos=torch.tensor([1]))[:, -1]
        torch.testing.assert_close(following, model(torch.tensor([[7, 8]]))[:, -1], rtol=1e-4, atol=1e-5)


def test_decode_attends_over_the_filled_span_only():
    model = random_model()
    decoder = greedy_decoder(model, 300)
    cache = decoder.cache
    assert cache.spans() == [64, 128, 256, 300]
    assert [cache.span_for(p) for p in (0, 63, 64, 200, 299, 5000)] == [64, 64, 128, 256, 300, 300]
    seen = []
    original = cache.update

    def spy(layer, k, v):
        out = original(layer, k, v)
        seen.append(out[0].size(2))
        return out

    cache.update = spy
    with torch.inference_mode():
        token = decoder.first_token(decoder.prefill(torch.tensor([[1, 2, 3]])))
        decoder.step(token)
    assert seen[-1] == 64  # the step after a 3-token prompt reads 64 slots, not 300


def test_a_cache_fixes_the_window():
    model = random_model()
    model.setup_cache(1, 8)
    with pytest.raises(ValueError, match="cache length"):
        model(torch.tensor([[1, 2]]), input_pos=torch.arange(2), window=4)


def test_window_equal_to_length_is_plain_causal_attention():
    model = random_model()
    seq = torch.randint(0, 300, (2, 12))
    with torch.no_grad():
        torch.testing.assert_close(model(seq, window=12), model(seq))
        assert not torch.allclose(model(seq, window=4), model(seq))


def test_cache_reorder_follows_rows():
    model = random_model()
    cache = model.setup_cache(3, 4)
    for kv in cache.layers:
        kv.k.normal_()
        kv.v.normal_()
    before = [(kv.k.clone(), kv.v.clone()) for kv in cache.layers]
    cache.reorder(torch.tensor([2, 2, 0]))
    for kv, (k, v) in zip(cache.layers, before):
        assert torch.equal(kv.k, k[[2, 2, 0]]) and torch.equal(kv.v, v[[2, 2, 0]])
    assert not any("kv_cache" in name for name in model.state_dict())


# ----------------------------------------------------------------------------- sampling


def test_sampling_rules():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    noise = lambda k, seed: torch.empty(1, k).exponential_(generator=torch.Generator().manual_seed(seed))
    assert sample(logits, Sampling(0.0, 5, 1.0), None).item() == 4  # temperature 0 is greedy
    assert {sample(logits, Sampling(1.0, 1, 1.0), noise(1, s)).item() for s in range(50)} == {4}  # top-k 1
    assert {sample(logits, Sampling(1.0, 2, 1.0), noise(2, s)).item() for s in range(200)} == {0, 4}  # only the top 2
    assert {sample(logits, Sampling(1.0, 5, 0.01), noise(5, s)).item()
            for s in range(50)} == {4}  # top-p keeps at least one
    assert {sample(logits, Sampling(1.0, 999, 0.01), noise(5, s)).item()
            for s in range(50)} == {4}  # top-k above V is clamped
    p = torch.softmax(logits[0], -1)
    # top-p 0.9: the smallest prefix of sorted tokens reaching 0.9 is {4, 0, 1} (0.63 + 0.23 + 0.09)
    assert p[[4, 0]].sum() < 0.9 <= p[[4, 0, 1]].sum()
    assert {sample(logits, Sampling(1.0, 5, 0.9), noise(5, s)).item() for s in range(300)} == {4, 0, 1}
    # top-k first, then top-p over the survivors' renormalised probabilities: of {4, 0}, 4 alone has 0.73 < 0.75
    assert {sample(logits, Sampling(1.0, 2, 0.75), noise(2, s)).item() for s in range(300)} == {4, 0}


def test_top_p_keeps_no_token_past_an_exact_mass():
    """Three equal tokens and top_p = 2/3: two of them reach the mass exactly, so the third is never kept."""
    logits = torch.zeros(1, 3)
    g = torch.Generator().manual_seed(0)
    draws = {sample(logits, Sampling(1.0, 3, 2 / 3), torch.empty(1, 3).exponential_(generator=g)).item()
             for _ in range(300)}
    assert len(draws) == 2  # which two depends on how topk orders ties


def test_a_tiny_temperature_is_greedy_not_nan():
    logits = torch.tensor([[2.0, 1.0, 0.5, -1.0, 3.0]])
    for temperature in (1e-44, 1e-39, 1e-30, 1e-7):  # logits / 1e-39 overflow float32 to inf, then NaN
        for seed in range(10):
            noise = torch.empty(1, 5).exponential_(generator=torch.Generator().manual_seed(seed))
            assert sample(logits, Sampling(temperature, 5, 0.9), noise).item() == 4


def test_sampling_matches_the_distribution():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.2]]))
    g = torch.Generator().manual_seed(0)
    draws = [sample(logits, Sampling(1.0, 3, 1.0), torch.empty(1, 3).exponential_(generator=g)).item()
             for _ in range(4000)]
    freq = [draws.count(i) / len(draws) for i in range(3)]
    assert freq == pytest.approx([0.5, 0.3, 0.2], abs=0.03)
    # temperature 2 flattens: p ~ sqrt(0.5, 0.3, 0.2)
    draws = [sample(logits, Sampling(2.0, 3, 1.0), torch.empty(1, 3).exponential_(generator=g)).item()
             for _ in range(4000)]
    expected = torch.tensor([0.5, 0.3, 0.2]).sqrt()
    expected = (expected / expected.sum()).tolist()
    assert [draws.count(i) / len(draws) for i in range(3)] == pytest.approx(expected, abs=0.03)


# ----------------------------------------------------------------------------- beam search


def test_beam_search_finds_the_exhaustive_optimum():
    V, eot, horizon, prompt = 5, 4, 3, [4, 1]
    model = random_model(vocabulary_size=V, scale=20.0, seed=3)
    for penalty in (0.0, 1.0):
        best = None
        for length in range(1, horizon + 1):
            for seq in itertools.product(range(V), repeat=length):
                if eot in seq[:-1] or (length < horizon and seq[-1] != eot):
                    continue  # sequences end at end-of-text, or are cut at the horizon
                with torch.no_grad():
                    logp = torch.log_softmax(model(torch.tensor([prompt + list(seq)]))[0].float(), -1)
                total = sum(logp[len(prompt) - 1 + i, t].item() for i, t in enumerate(seq))
                score = total / length**penalty
                if best is None or score > best[0]:
                    best = (score, list(seq))
        found = search(model, prompt, eot, beam_width=V ** (horizon - 1), num_candidates=1, max_tokens=horizon,
                       context_length=16, length_penalty=penalty)[0]
        assert found.tokens == best[1]
        assert found.score == pytest.approx(best[0], abs=1e-4)


def test_beam_width_one_is_greedy():
    model = random_model()
    prompt = [1, 2, 3]
    found = search(model, prompt, end=299, beam_width=1, num_candidates=1, max_tokens=25, context_length=8)[0]
    assert found.tokens == greedy_by_recomputation(model, prompt, 25, window=8)


# ----------------------------------------------------------------------------- scripts


@pytest.fixture(scope="module")
def checkpoint(certain):
    """The certain base model (tests/helpers.py): it writes free letters and never ends its text, so
    every answer below runs to --max_tokens on any CPU, each seed its own."""
    return certain.base


def gen(checkpoint, *extra):
    return generate.main(generate.parse_args(["--checkpoint_path", checkpoint, "--device", "cpu", *extra]))


def test_same_seed_same_text_other_seed_other_text(checkpoint, capsys):
    runs = []
    for seed in ("1", "1", "2"):
        tokens = gen(checkpoint, "--prompt", "The ", "--max_tokens", "40", "--seed", seed)
        runs.append((tokens, capsys.readouterr().out))
    (a, text_a), (b, text_b), (c, text_c) = runs
    assert a == b and a != c and len(a[0]) == 40  # the certain base never ends its text
    assert text_a == text_b != text_c


def test_prompts_from_standard_input(checkpoint, monkeypatch, capsys):
    """Piped: blank lines skipped, each answer under its prompt echoed after '> ', answers a blank line
    apart. Typed: a '> ' prompt before each line, and a newline when input ends."""
    class Terminal(io.StringIO):
        def isatty(self):
            return True

    lines = "first\n\n   \nsecond prompt\n"
    monkeypatch.setattr(sys, "stdin", io.StringIO(lines))
    outputs = gen(checkpoint, "--max_tokens", "5", "--temperature", "0")
    assert len(outputs) == 2 and all(len(o) == 5 for o in outputs)
    texts = [load_encoding("bytes").decode_bytes(o).decode("utf-8", errors="ignore") for o in outputs]
    assert capsys.readouterr().out == f"> first\n{texts[0]}\n\n> second prompt\n{texts[1]}\n"
    monkeypatch.setattr(sys, "stdin", Terminal(lines))
    assert gen(checkpoint, "--max_tokens", "5", "--temperature", "0") == outputs
    assert capsys.readouterr().out == f"> {texts[0]}\n> > > {texts[1]}\n> \n"  # a fresh '> ' after a blank line


def test_output_holds_whole_characters_only():
    """A stray continuation byte (a model can start mid-character) is left out, not shown as U+FFFD, and
    a character split over several tokens is printed whole."""
    encoding = load_encoding("bytes")
    out = io.StringIO()
    printer = generate.TokenPrinter(encoding, out)
    for token in [0x80, 0xBF, *"a😀b".encode(), 0xF0, 0x9F]:  # continuation bytes, text, a cut emoji
        printer.write(token)
    printer.close()
    assert out.getvalue() == "a😀b\n"
    assert generate.decode_text(encoding, [0x9F, *"é".encode()]) == "é"


def test_ctrl_c_ends_the_line_before_saying_interrupted(checkpoint, monkeypatch, capsys):
    def interrupt(self, token):
        raise KeyboardInterrupt

    monkeypatch.setattr(generate.Decoder, "step", interrupt)
    with pytest.raises(SystemExit) as stop:
        run_main(generate.main, generate.parse_args,
                 ["--checkpoint_path", checkpoint, "--device", "cpu", "--prompt", "Hello", "--temperature", "0"])
    assert stop.value.code == 130
    captured = capsys.readouterr()
    assert captured.out.endswith("\n") and captured.err == "interrupted\n"


@pytest.mark.slow  # three script processes, seconds each
def test_scripts_run_piped_from_the_command_line(checkpoint):
    for script, extra in (("generate.py", ["--max_tokens", "8", "--seed", "0"]),
                          ("beam_search.py", ["--max_tokens", "6", "--beam_width", "4"])):
        result = subprocess.run([sys.executable, script, "--checkpoint_path", checkpoint, "--device", "cpu", *extra],
                                input="Hello\nWorld\n", cwd=ROOT, capture_output=True, text=True, timeout=120)
        assert result.returncode == 0, result.stderr
        assert result.stdout.strip()


def test_beam_search_script_prints_ranked_candidates(checkpoint, capsys):
    args = beam_search.parse_args(["--checkpoint_path", checkpoint, "--device", "cpu", "--prompt", "def ",
                                   "--max_tokens", "6", "--beam_width", "4", "--num_candidates", "2"])
    found = beam_search.main(args)[0]
    assert len(found) == 2 and found[0].score >= found[1].score
    out = capsys.readouterr().out
    assert out.count("normalised") == 2 and "[1] log-probability" in out


fails_with = fails_with_one_line


@pytest.mark.parametrize("module", [generate, beam_search])
def test_inference_errors_are_one_line(module, checkpoint, capsys, tmp_path):
    base = ["--device", "cpu", "--prompt", "x"]
    fails_with(capsys, module, base + ["--checkpoint_path", str(tmp_path / "none.pt")], "no checkpoint at")
    (tmp_path / "bad.pt").write_bytes(b"garbage")
    fails_with(capsys, module, base + ["--checkpoint_path", str(tmp_path / "bad.pt")],
               "not a LightGPT checkpoint (not a PyTorch file)")
    torch.save({"kind": "lora", "version": 1}, tmp_path / "lora.pt")
    fails_with(capsys, module, base + ["--checkpoint_path", str(tmp_path / "lora.pt")], "'lora' checkpoint")
    ok = base + ["--checkpoint_path", checkpoint]
    fails_with(capsys, module, ok + ["--lora_path", "x.pt"], "--lora_path: no checkpoint at x.pt")
    fails_with(capsys, module, ok + ["--lora_path", checkpoint], "--lora_path", "a 'pretrain' checkpoint, expected a 'lora'")
    fails_with(capsys, module, ok + ["--system", "Be brief."], "--system needs a chat model")
    fails_with(capsys, module, ok + ["--max_tokens", "0"], "--max_tokens", "positive integer")
    fails_with(capsys, module, ok + ["--context_length", "-4"], "--context_length")
    fails_with(capsys, module, ok + ["--context_length", str(10**12)], f"--context_length {10**12}", "GiB", "lower it")


def test_sampling_flag_errors(capsys):
    fails_with(capsys, generate, ["--top_p", "0"], "--top_p", "(0, 1]")
    fails_with(capsys, generate, ["--top_p", "1.5"], "--top_p")
    fails_with(capsys, generate, ["--top_k", "0"], "--top_k", "positive integer")
    fails_with(capsys, generate, ["--temperature", "-1"], "--temperature", ">= 0")
    fails_with(capsys, beam_search, ["--num_candidates", "5", "--beam_width", "4"],
               "--num_candidates 5 is larger than --beam_width 4")


@pytest.mark.parametrize("chunk", [3, 8, 1024])
def test_a_long_prompt_is_prefilled_in_chunks_equal_to_recomputation(chunk, monkeypatch):
    """A prompt five times the window, prefilled a few tokens at a time: the same greedy tokens as
    recomputing with a sliding window, and never a (prompt x prompt) mask."""
    import model as model_module

    model = random_model(layers=3)
    prompt = torch.randint(0, 300, (40,), generator=torch.Generator().manual_seed(4)).tolist()
    expected = greedy_by_recomputation(model, prompt, 12, 8)
    made = []
    original = model_module.sliding_window_mask
    monkeypatch.setattr(model_module, "sliding_window_mask", lambda T, *a: made.append(T) or original(T, *a))
    monkeypatch.setattr(generate, "PREFILL_CHUNK", chunk)
    assert greedy_with_cache(model, prompt, 12, 8) == expected
    assert all(T <= 8 for T in made), made


def test_a_chunk_that_continues_a_sequence_attends_to_the_ring():
    model = random_model()
    seq = torch.randint(0, 300, (1, 30), generator=torch.Generator().manual_seed(5))
    model.setup_cache(1, 16)
    with torch.no_grad():
        model(seq[:, :10], input_pos=torch.arange(10))
        chunk = model(seq[:, 10:22], input_pos=torch.arange(10, 22))
        torch.testing.assert_close(chunk, model(seq[:, :22], window=16)[:, 10:], rtol=1e-4, atol=1e-5)
        with pytest.raises(ValueError, match="at most the cache length"):
            model(seq[:, :20], input_pos=torch.arange(5, 25))


@pytest.mark.slow  # three script processes
def test_hostile_standard_input_and_a_closed_pipe(checkpoint):
    """Invalid UTF-8 on stdin, stdin closed, and output piped into a reader that leaves (`| head`):
    no traceback; a closed pipe ends quietly with 141 (128 + SIGPIPE), as Unix tools do."""
    base = [sys.executable, "generate.py", "--checkpoint_path", checkpoint, "--device", "cpu", "--max_tokens", "3"]
    bad = subprocess.run(base, input=b"caf\xe9 \xff\n", cwd=ROOT, capture_output=True, timeout=120)
    assert bad.returncode == 0 and bad.stderr == b"" and bad.stdout.startswith("> caf\ufffd \ufffd\n".encode())
    closed = subprocess.run(" ".join(base) + " <&-", shell=True, cwd=ROOT, capture_output=True, text=True,
                            timeout=120)
    assert closed.returncode == 2 and closed.stderr.strip() == "error: no prompt: pass --prompt, or give prompts " \
        "on standard input"
    reader = subprocess.Popen(base, stdin=subprocess.PIPE, stdout=subprocess.PIPE, stderr=subprocess.PIPE, cwd=ROOT)
    reader.stdin.write(b"x\n" * 2000)
    reader.stdin.close()
    reader.stdout.read(1)
    reader.stdout.close()  # the reader leaves after one byte
    assert reader.wait(timeout=120) == 141
    assert reader.stderr.read() == b""



def test_sizes_and_numbers_past_what_a_machine_holds(checkpoint, capsys):
    base = ["--checkpoint_path", checkpoint, "--device", "cpu", "--prompt", "x"]
    fails_with(capsys, beam_search, base + ["--beam_width", str(10**9)], f"--beam_width {10**9}", "GiB")
    fails_with(capsys, beam_search, base + ["--length_penalty", "1000"], "--length_penalty", "[0, 10]")
    fails_with(capsys, generate, base + ["--seed", str(2**64)], "--seed", "[0, 2**63)")
    fails_with(capsys, pretrain, ["--seed", str(2**70)], "--seed", "[0, 2**63)")


def test_stop_strings_end_the_answer_before_them(checkpoint, certain, capsys):
    """--stop: the text ends before the first stop string (printed so, the tokens up to the one that completed
    it); a chat answer too, and the conversation goes on after it."""
    tokens = gen(checkpoint, "--prompt", "The ", "--max_tokens", "40", "--temperature", "0")[0]
    text = capsys.readouterr().out.removesuffix("\n")
    stop = text[10:12]
    cut = gen(checkpoint, "--prompt", "The ", "--max_tokens", "40", "--temperature", "0", "--stop", "zzz",
              "--stop", stop)[0]
    assert capsys.readouterr().out == text[: text.index(stop)] + "\n"
    assert cut == tokens[: len(cut)] and len(cut) == text.index(stop) + len(stop)  # bytes: one token each
    chat = ["--checkpoint_path", certain.base, "--lora_path", certain.lora, "--device", "cpu", "--temperature", "0"]
    whole = generate.main(generate.parse_args([*chat, "--prompt", "Hi"]))[0]
    answer = capsys.readouterr().out.removesuffix("\n")
    short = generate.main(generate.parse_args([*chat, "--prompt", "Hi", "--stop", answer[1:2]]))[0]
    assert capsys.readouterr().out == answer[:1] + "\n" and short == whole[:len(short)] and len(short) < len(whole)
    with pytest.raises(SystemExit):
        generate.parse_args(["--stop", ""])
