"""sampling.py: the logit bias, the penalties (repetition, presence, frequency) and min-p on hand-made logits,
then through generate.py's decoder and the engine: penalised answers batched equal penalised answers alone,
and the flags and server fields that set them."""

import pytest
import torch
from test_engine import loaded, one_at_a_time, prompts, staggered, tiny

from engine import Engine, Request
from sampling import Sampling, adjusted, sample

V = 6


def test_bias_then_penalties_as_openai_and_ctrl_define_them():
    logits = torch.tensor([[2.0, -2.0, 1.0, 0.5, 0.0, 3.0]])
    counts = torch.tensor([[2.0, 1.0, 0.0, 0.0, 0.0, 0.0]])  # the answer holds token 0 twice, token 1 once
    in_prompt = torch.tensor([[False, False, True, False, False, False]])  # the prompt holds token 2
    biased = adjusted(logits, Sampling(logit_bias=((3, 10.0), (5, -100.0))), counts, in_prompt)
    assert biased.tolist() == [[2.0, -2.0, 1.0, 10.5, 0.0, -97.0]]
    openai = adjusted(logits, Sampling(presence_penalty=0.5, frequency_penalty=0.25), counts, in_prompt)
    assert openai.tolist() == [[2.0 - 0.5 - 0.5, -2.0 - 0.5 - 0.25, 1.0, 0.5, 0.0, 3.0]]
    ctrl = adjusted(logits, Sampling(repetition_penalty=2.0), counts, in_prompt)
    assert ctrl.tolist() == [[1.0, -4.0, 0.5, 0.5, 0.0, 3.0]]  # seen: positive halved, negative doubled
    assert adjusted(logits, Sampling(), None, None) is logits  # nothing asked: nothing computed


def test_min_p_keeps_only_the_tokens_near_the_likeliest():
    logits = torch.log(torch.tensor([[0.5, 0.3, 0.15, 0.05, 1e-9, 1e-9]]))
    kept = set()
    for seed in range(200):
        noise = torch.empty(1, V).exponential_(generator=torch.Generator().manual_seed(seed))
        kept.add(sample(logits, Sampling(1.0, V, 1.0, min_p=0.4), noise).item())
    assert kept == {0, 1}  # 0.15 < 0.4 x 0.5: cut
    greedy = Sampling(temperature=0.0, presence_penalty=2.0)
    counts = torch.tensor([[1.0, 0, 0, 0, 0, 0]])
    assert sample(logits, greedy, None, counts, torch.zeros(1, V, dtype=torch.bool)).item() == 1


def test_a_presence_penalty_stops_the_decoder_repeating():
    """Greedy decoding of a tiny model repeats itself; with a large presence penalty no token comes twice."""
    model = tiny()
    prompt = prompts([5])[0]
    plain = one_at_a_time(model, Request(prompt, 40, Sampling(temperature=0.0)), 64)
    assert len(set(plain)) < len(plain)
    fresh = one_at_a_time(model, Request(prompt, 40, Sampling(temperature=0.0, presence_penalty=2.0,
                                                              logit_bias=((1, -100.0),))), 64)
    penalised = one_at_a_time(model, Request(prompt, 40, Sampling(temperature=0.0, frequency_penalty=2.0)), 64)
    assert fresh != plain and penalised != plain and 1 not in fresh
    repeated = one_at_a_time(model, Request(prompt, 40, Sampling(temperature=0.0, repetition_penalty=4.0)), 64)
    assert repeated != plain


def test_penalised_requests_batched_equal_each_alone():
    """The engine keeps each row's history: penalised, biased and min-p requests, greedy and seeded, give in
    one batch (next to plain ones) what each gives decoded alone."""
    model, L = tiny(), 64
    settings = [Sampling(0.0, presence_penalty=1.5), Sampling(1.0, 50, 0.9, frequency_penalty=0.7),
                Sampling(0.0), Sampling(0.8, 500, 1.0, min_p=0.05, repetition_penalty=1.3),
                Sampling(1.0, 50, 0.9, logit_bias=((3, 5.0),), presence_penalty=-0.5)]
    requests = [Request(p, max_tokens=24, sampling=s, seed=i)
                for i, (p, s) in enumerate(zip(prompts([4, 9, 2, 6, 3]), settings))]
    expected = [one_at_a_time(model, r, L) for r in requests]
    with Engine(loaded(model), context_length=L, max_batch=3) as engine:
        outputs, _ = staggered(engine, requests, gap_tokens=2)
    assert outputs == expected


@pytest.mark.parametrize("flag, value, message", [
    ("--min_p", "1", "[0, 1)"), ("--repetition_penalty", "0", "positive"), ("--presence_penalty", "3", "[-2, 2]"),
    ("--frequency_penalty", "x", "[-2, 2]"),
])
def test_the_sampling_flags_are_checked(flag, value, message, capsys):
    import generate

    with pytest.raises(SystemExit):
        generate.parse_args([flag, value])
    err = capsys.readouterr().err
    assert flag in err and message in err, err
