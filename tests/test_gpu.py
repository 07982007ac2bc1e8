"""Checks that only a CUDA GPU can run: the CUDA-graph decoder against the eager one. They are skipped on
machines without CUDA (CI); tests/gpu_check.sh runs them on a GPU."""

import pytest
import torch

from generate import Decoder, Sampler, Sampling
from model import GPT, GPTConfig

pytestmark = pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")


def peaked_model(device, layers=3):
    """A random bf16 model with sharp next-token distributions, so greedy choices are not near-ties."""
    torch.manual_seed(0)
    model = GPT(GPTConfig(vocabulary_size=300, embedding_dimensions=64, num_attention_heads=4,
                          num_hidden_layers=layers, dropout=0.0))
    with torch.no_grad():
        model.token_embeddings.weight.mul_(20.0)
    return model.to(device=device, dtype=torch.bfloat16).eval()


def decode(model, prompt, steps, context_length, sampling, seed, use_compile):
    decoder = Decoder(model, context_length, 1, sampling, Sampler(model.token_embeddings.weight.device, seed),
                      use_compile=use_compile)
    with torch.inference_mode():
        token = decoder.first_token(decoder.prefill(torch.tensor([prompt], device=decoder.device)))
        out = [int(token)]
        for _ in range(steps - 1):
            token = decoder.step(token)
            out.append(int(token))
    return out, decoder


@pytest.mark.parametrize("sampling", [Sampling(temperature=0.0), Sampling(1.0, 50, 0.9)], ids=["greedy", "sampled"])
def test_cuda_graph_decoding_equals_eager_decoding(sampling):
    """Through three spans (64, 128, 130) and past the ring's wrap; sampled with the same seed."""
    model = peaked_model(torch.device("cuda"))
    prompt = [5, 6, 7, 8]
    eager, _ = decode(model, prompt, 150, 130, sampling, 3, use_compile=False)
    graphed, decoder = decode(model, prompt, 150, 130, sampling, 3, use_compile=True)
    assert sorted(decoder.graphs) == [64, 128, 130]  # one CUDA graph per span
    assert graphed == eager


def test_a_new_prompt_reuses_the_graphs_and_starts_fresh():
    model = peaked_model(torch.device("cuda"))
    sampling = Sampling(temperature=0.0)
    decoder = Decoder(model, 64, 1, sampling, Sampler(torch.device("cuda"), 0), use_compile=True)
    runs = []
    with torch.inference_mode():
        for prompt in ([1, 2, 3], [9, 8, 7, 6, 5], [1, 2, 3]):
            token = decoder.first_token(decoder.prefill(torch.tensor([prompt], device="cuda")))
            out = [int(token)]
            for _ in range(20):
                token = decoder.step(token)
                out.append(int(token))
            runs.append(out)
    assert runs[0] == runs[2] != runs[1]
    assert list(decoder.graphs) == [64]


@pytest.mark.parametrize("use_compile", [False, True], ids=["eager", "compiled"])
def test_batched_engine_on_cuda_equals_one_at_a_time(use_compile):
    """engine.py on the GPU (bf16, per-row positions, rows joining and leaving): each request's greedy
    tokens are those of the batch-1 decoder."""
    import threading

    from engine import Engine, Request
    from generate import Loaded

    model = peaked_model(torch.device("cuda"))
    prompts = [[5, 6, 7, 8], list(range(10, 40)), [3], list(range(50, 60))]
    requests = [Request(p, max_tokens=n, sampling=Sampling(temperature=0.0)) for p, n in zip(prompts, [90, 20, 140, 5])]
    expected = [decode(model, r.prompt, r.max_tokens, 130, r.sampling, 0, use_compile=False)[0] for r in requests]
    outputs, done = [[] for _ in requests], [threading.Event() for _ in requests]
    with Engine(Loaded(model, None, 0), context_length=130, max_batch=3, use_compile=use_compile) as engine:
        for i, r in enumerate(requests):  # four requests for three rows: the last waits for a free row
            engine.submit(r, lambda e, i=i: outputs[i].append(e.token) if e.token is not None else done[i].set())
        assert all(d.wait(600) for d in done) and engine.last_error is None
    assert outputs == expected
