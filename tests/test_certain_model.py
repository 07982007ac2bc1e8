"""The certain model (tests/helpers.py) that plumbing tests run on: what it says cannot change with
rounding (another CPU's kernels) or sampling, because its next token is always more than helpers.MARGIN
nats above any other."""

import pytest
import torch
from helpers import BASE_AFTER_Y, CHAT_ANSWER, FREE_LETTERS, MARGIN, margins

from chat import render_prompt
from generate import Decoder, Sampler, Sampling, generate, load_for_inference

CONVERSATIONS = [
    [{"role": "user", "content": "Say apple."}],
    [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Tell me a long story, with yes. in it!"}],
    [{"role": "user", "content": "Say river."}, {"role": "assistant", "content": "yes."},
     {"role": "user", "content": "Again.\n\nAnd again."}],
]


@pytest.mark.parametrize("which", ["lora", "merged"])
def test_the_chat_model_answers_yes_then_im_end_by_a_wide_margin(certain, which):
    loaded = (load_for_inference(certain.base, torch.device("cpu"), certain.lora) if which == "lora"
              else load_for_inference(certain.merged, torch.device("cpu")))
    tok = loaded.chat
    for messages in CONVERSATIONS:
        prompt = render_prompt(tok, messages)
        chain, free = margins(loaded.model, prompt + tok.encode_text(CHAT_ANSWER), chat=True)
        assert chain > MARGIN and free > MARGIN, (chain, free)
        for sampling, seeds in ((Sampling(temperature=0.0), [0]), (Sampling(1.0, 10**6, 1.0), range(5)),
                                (Sampling(1.5, 40, 0.9), range(5))):
            for seed in seeds:
                decoder = Decoder(loaded.model, 256, 1, sampling, Sampler(torch.device("cpu"), seed), False)
                assert tok.decode(generate(decoder, prompt, loaded.stop, 40)) == CHAT_ANSWER + "<|im_end|>"


def test_the_base_model_writes_free_letters_and_ends_only_after_yes(certain):
    loaded = load_for_inference(certain.base, torch.device("cpu"))
    text = [loaded.eot, *b"The return statement x, and <|im_end|> as text:\n"]
    chain, free = margins(loaded.model, text + list(b"yes."), chat=False)
    assert chain > MARGIN and free > MARGIN, (chain, free)
    samples = set()
    for seed in range(4):
        decoder = Decoder(loaded.model, 64, 1, Sampling(1.0, 10**6, 1.0), Sampler(torch.device("cpu"), seed), False)
        out = loaded.encoding.decode(generate(decoder, text, loaded.stop, 200))  # past the cache's length
        assert len(out) == 200 and set(out) <= set(FREE_LETTERS)
        samples.add(out)
    assert len(samples) == 4  # free text: each seed its own
    decoder = Decoder(loaded.model, 64, 1, Sampling(1.0, 10**6, 1.0), Sampler(torch.device("cpu"), 0), False)
    assert generate(decoder, text + [ord("y")], loaded.stop, 10) == [*BASE_AFTER_Y.encode(), loaded.eot]
