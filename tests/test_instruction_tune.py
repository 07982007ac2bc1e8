"""instruction-tune.py end to end on tiny models, and chatting through generate.py / beam_search.py."""

import importlib
import io
import json
import os
import sys

import pytest
import torch
from conftest import fails_with_one_line, tune_args
from helpers import CHAT_ANSWER, check, launch, losses

import beam_search
import generate
from chat import ChatTokenizer, render_prompt
from checkpoint import load_checkpoint, model_from_checkpoint, save_checkpoint
from data import load_encoding
from generate import Conversation, Decoder, Sampler, Sampling, load_for_inference
from lora import LoRAConfig, lora_model
from model import IGNORE_INDEX

tune = importlib.import_module("instruction-tune")


def run_tune(*argv):
    return tune.main(tune.parse_args(list(argv)))


def test_tuning_lowers_test_loss_and_saves_only_what_trained(base, tuned):
    out, history = tuned
    assert history[0][0] == 0 and history[-1][1] < 0.7 * history[0][1], history
    lora = load_checkpoint(str(out / "lora.pt"), "lora")
    assert set(lora["adapters"]) == {"token_embeddings.new"} | {
        f"blocks.{i}.{t}.lora_{ab}" for i in range(2) for t in ("attn.qkv", "attn.proj", "mlp.up", "mlp.down")
        for ab in "ab"}
    assert lora["lora"]["rank"] == 4 and lora["lora"]["alpha"] == 8.0
    assert lora["special_tokens"] == ["<|im_start|>", "<|im_end|>", "<|pad|>"]
    assert lora["base"]["sha256"] == load_checkpoint(base, "pretrain")["sha256"]
    assert lora["config"]["vocabulary_size"] == 257 + 3
    assert os.path.getsize(out / "lora.pt") < os.path.getsize(base) / 2  # adapters only, not the base's weights


@pytest.mark.parametrize("model", ["tuned", "certain"])
def test_merged_checkpoint_answers_as_base_plus_adapters(model, request, capsys):
    """The trained LoRA's merge and the certain model's (hand-set adapters) answer token for token as base
    plus adapters do, and otherwise than the base alone."""
    if model == "tuned":
        base, out = request.getfixturevalue("base"), request.getfixturevalue("tuned")[0]
        lora, merged = str(out / "lora.pt"), str(out / "merged.pt")
    else:
        paths = request.getfixturevalue("certain")
        base, lora, merged = paths.base, paths.lora, paths.merged
    flags = ["--device", "cpu", "--prompt", "Say river.", "--temperature", "0", "--max_tokens", "12"]
    with_lora = generate.main(generate.parse_args(["--checkpoint_path", base, "--lora_path", lora, *flags]))
    merged = generate.main(generate.parse_args(["--checkpoint_path", merged, *flags]))
    plain = generate.main(generate.parse_args(["--checkpoint_path", base, *flags]))
    assert with_lora == merged and with_lora != plain
    capsys.readouterr()


@pytest.mark.parametrize("temperature", [0.0, 1.0])
def test_answers_come_in_the_assistant_role_and_stop_at_im_end(certain, temperature):
    loaded = load_for_inference(certain.base, torch.device("cpu"), certain.lora)
    chat = loaded.chat
    sampling = Sampling(temperature=temperature)
    decoder = Decoder(loaded.model, 256, 1, sampling, Sampler(torch.device("cpu"), 0), False)
    conversation = Conversation(loaded, decoder, None)
    answer = conversation.reply("Say tiger.", max_tokens=40)
    # the model answers after <|im_start|>assistant\n; its <|im_end|> ends the turn and is not in the answer
    assert chat.decode(answer) == CHAT_ANSWER and conversation.pending == [chat.im_end]


def test_the_tuned_model_prefers_what_it_was_taught(base, tuned):
    """It learned: after the chat prompt, the tuned model gives the answer of its training conversations
    ("yes." and <|im_end|>, without a system message) a loss far below the one it had before tuning (the
    base with its new rows, adapters at zero): 1.4 against 6.0 nats a token, asserted with a factor of
    2 that no rounding crosses. Which answer a greedy decoder picks is for the certain model's plumbing
    tests: a tiny model on the edge of having learned a 4-byte answer says "ye" on another CPU."""
    out, _ = tuned
    base_model = model_from_checkpoint(load_checkpoint(base, "pretrain"))
    before = lora_model(base_model, LoRAConfig(4, 8.0), 3).eval()  # tune_args' rank and alpha
    after = load_for_inference(base, torch.device("cpu"), str(out / "lora.pt")).model
    tok = ChatTokenizer(load_encoding("bytes"))
    prompt = render_prompt(tok, [{"role": "user", "content": "Say tiger."}])
    ids = torch.tensor([prompt + tok.encode_text("yes.") + [tok.im_end]])
    targets = ids[:, 1:].clone()
    targets[:, : len(prompt) - 1] = IGNORE_INDEX  # the answer's tokens only

    def answer_loss(model) -> float:
        with torch.no_grad():
            return model(ids[:, :-1], targets).item()

    assert answer_loss(after) < answer_loss(before) / 2, (answer_loss(after), answer_loss(before))


def test_multi_turn_chat_with_the_cached_conversation_equals_a_fresh_prefill(certain):
    """The second turn is prefilled after what the cache holds; the same whole conversation rendered
    afresh and prefilled from scratch gives the same answer."""
    loaded = load_for_inference(certain.base, torch.device("cpu"), certain.lora)
    tok = loaded.chat

    def decoder():
        return Decoder(loaded.model, 256, 1, Sampling(temperature=0.0), Sampler(torch.device("cpu"), 0), False)

    chat = Conversation(loaded, decoder(), "Be brief.")
    opening = chat.turn_tokens("Say lemon.")
    first = chat.reply("Say lemon.", max_tokens=40)
    follow_up = chat.turn_tokens("Again.")
    second = chat.reply("Again.", max_tokens=40)
    assert chat.pending == [tok.im_end]  # both answers ended their turn (none cut at max_tokens)
    whole = opening + first + follow_up
    messages = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Say lemon."},
                {"role": "assistant", "content": tok.decode(first)}, {"role": "user", "content": "Again."}]
    assert whole == render_prompt(tok, messages)  # the cache holds exactly the rendered conversation
    fresh = generate.generate(decoder(), whole, loaded.stop, 40)
    assert fresh[-1] == tok.im_end and fresh[:-1] == second and second


@pytest.mark.slow  # two tuning runs: the slow tier (CI runs it)
def test_resume_continues_exactly(base, chats, tmp_path):
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    common = ("--lr_schedule", "constant", "--dropout", "0.2")
    run_tune(*tune_args(base, chats, straight, "--num_epochs", "2", *common))
    run_tune(*tune_args(base, chats, halves, "--num_epochs", "1", *common))
    run_tune(*tune_args(base, chats, halves, "--num_epochs", "2", "--resume", *common))
    a, b = load_checkpoint(str(straight / "lora.pt"), "lora"), load_checkpoint(str(halves / "lora.pt"), "lora")
    assert a["step"] == b["step"] > 0
    for name in a["adapters"]:
        assert torch.equal(a["adapters"][name], b["adapters"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)


@pytest.mark.slow
def test_full_tuning_trains_every_weight_resumes_exactly_and_merges(base, chats, tmp_path, capsys):
    """--full: every weight trains (no adapters); the checkpoint is the whole chat model with its training
    state, resumes exactly, loads in generate.py, and --merge_path writes it without the optimizer state."""
    straight, halves = tmp_path / "straight", tmp_path / "halves"
    common = ("--full", "--lr_schedule", "constant", "--dropout", "0.1", "--learning_rate", "1e-2",
              "--checkpoint_path")
    run_tune(*tune_args(base, chats, straight, "--num_epochs", "2", *common, str(straight / "full.pt")))
    run_tune(*tune_args(base, chats, halves, "--num_epochs", "1", *common, str(halves / "full.pt")))
    run_tune(*tune_args(base, chats, halves, "--num_epochs", "2", "--resume", "--merge_path", str(halves / "chat.pt"),
                        *common, str(halves / "full.pt")))
    a, b = load_checkpoint(str(straight / "full.pt"), "pretrain"), load_checkpoint(str(halves / "full.pt"), "pretrain")
    assert a["step"] == b["step"] > 0 and a["model"].keys() == b["model"].keys()
    for name in a["model"]:
        assert torch.equal(a["model"][name], b["model"][name]), name
    for index, state in a["optimizer"]["state"].items():
        for key, value in state.items():
            assert torch.equal(value, b["optimizer"]["state"][index][key]), (index, key)
    pretrained = load_checkpoint(base, "pretrain")
    assert a["special_tokens"] == ["<|im_start|>", "<|im_end|>", "<|pad|>"] and "adapters" not in a
    assert a["base"]["sha256"] == pretrained["sha256"]
    assert a["config"]["vocabulary_size"] == 257 + 3 and a["config"]["dropout"] == 0.1
    for name, weight in pretrained["model"].items():  # every weight moved, the old vocabulary's rows too
        tuned = a["model"][name][: weight.shape[0]]
        assert torch.isfinite(tuned).all() and not torch.equal(tuned, weight), name
    merged = load_checkpoint(str(halves / "chat.pt"), "pretrain")
    assert "optimizer" not in merged and merged["special_tokens"] == a["special_tokens"]
    assert all(torch.equal(merged["model"][k], b["model"][k]) for k in b["model"])
    assert not os.path.exists(halves / "full-peft")  # no adapters, no peft folder
    flags = ["--device", "cpu", "--prompt", "Say river.", "--temperature", "0", "--max_tokens", "8"]
    answers = [generate.main(generate.parse_args(["--checkpoint_path", str(path), *flags]))
               for path in (halves / "full.pt", halves / "chat.pt")]
    assert answers[0] == answers[1]
    capsys.readouterr()


def test_full_and_lora_checkpoints_do_not_resume_each_other(base, chats, tuned, tmp_path, capsys):
    out, _ = tuned
    fails = lambda argv, *fragments: fails_with_one_line(capsys, tune, argv, *fragments)  # noqa: E731
    fails(tune_args(base, chats, out, "--resume", "--full"), "tuned with LoRA: resume it without --full")
    full = tmp_path / "full.pt"
    run_tune(*tune_args(base, chats, tmp_path, "--full", "--num_epochs", "1", "--checkpoint_path", str(full)))
    fails(tune_args(base, chats, tmp_path, "--resume", "--checkpoint_path", str(full)),
          "is a 'pretrain' checkpoint", "resumes with --full")
    fails(tune_args(base, chats, tmp_path, "--full", "--peft_path", str(tmp_path / "p")), "--peft_path", "export.py")


def test_packed_rows_hold_only_valid_ids(base, chats, tmp_path):
    from chat import pack, prepare_chat_data

    tok = ChatTokenizer(load_encoding("bytes"))
    data = prepare_chat_data(chats, None, "bytes", str(tmp_path), 1)
    rows = pack(data.train, 64, True, tok.pad)
    assert rows.inputs.min() >= 0 and rows.inputs.max() < tok.vocabulary_size
    valid = rows.targets[rows.targets != -100]
    assert valid.min() >= 0 and valid.max() < tok.vocabulary_size


def test_a_finished_run_merges_on_resume_and_keeps_its_data(base, chats, tuned, tmp_path, capsys):
    out, _ = tuned
    merged = tmp_path / "again.pt"
    args = tune_args(base, chats, out, "--resume", "--merge_path", str(merged))
    assert run_tune(*args) == []  # nothing left to train: only the merge
    assert "already complete" in capsys.readouterr().out
    a, b = load_checkpoint(str(out / "merged.pt"), "pretrain"), load_checkpoint(str(merged), "pretrain")
    assert all(torch.equal(a["model"][k], b["model"][k]) for k in a["model"])
    other = tmp_path / "other.jsonl"
    other.write_text(open(chats).read())
    fails_with_one_line(capsys, tune, tune_args(base, str(other), out, "--resume", "--num_epochs", "9"),
                        f"--dataset {other} differs from the checkpoint's {chats}; pass --dataset {chats}")
    unmasked = [a for a in tune_args(base, chats, out, "--resume", "--num_epochs", "9") if a != "--mask_input"]
    fails_with_one_line(capsys, tune, unmasked, "--mask_input False differs from the checkpoint's True; pass --mask_input")


@pytest.mark.slow
@pytest.mark.parametrize("level,full", [(0, False), (3, False), (3, True)])
def test_two_processes_tune_as_one_does(base, chats, tmp_path, level, full):
    """torchrun with 2 CPU processes (gloo), DDP or FSDP sharding everything, with LoRA or --full: the same
    losses and trained weights as one process (the global batch does not depend on the world size)."""
    flags = ("--dropout", "0", "--num_epochs", "2", "--gradient_accumulation_steps", "2")
    if full:
        flags += ("--full", "--learning_rate", "1e-2")
    one = check(launch(1, tune_args(base, chats, tmp_path / "one", *flags), script="instruction-tune.py"))
    two = check(launch(2, tune_args(base, chats, tmp_path / "two", *flags, "--ddp_sharding_level", str(level)),
                       script="instruction-tune.py"))
    assert f"2 processes, {'ddp' if level == 0 else 'fsdp level 3'}" in two.stdout
    assert losses(two.stdout) == pytest.approx(losses(one.stdout), abs=1e-4)
    kind, entry = ("pretrain", "model") if full else ("lora", "adapters")
    a = load_checkpoint(str(tmp_path / "one" / "lora.pt"), kind)[entry]
    b = load_checkpoint(str(tmp_path / "two" / "lora.pt"), kind)[entry]
    assert a.keys() == b.keys()
    # Summed in another order, the gradients differ in the last bits, and Adafactor's normalised steps
    # carry that on: 3e-6 apart at most with AVX2 kernels, 3.2e-5 (on weights up to 0.3) with the generic
    # ones (ATEN_CPU_CAPABILITY=default); training moves them from zero to 0.3.
    for name in a:
        torch.testing.assert_close(a[name], b[name], rtol=1e-3, atol=1e-4, msg=name)


# ----------------------------------------------------------------------------- errors


@pytest.fixture
def no_progress_bars():
    """datasets' progress bars share stderr with the error line (a \\r counts as a line break there)."""
    import datasets

    datasets.disable_progress_bars()
    yield
    datasets.enable_progress_bars()


def test_bad_inputs_end_with_one_line(base, chats, tuned, tmp_path, capsys, no_progress_bars):
    out, _ = tuned
    fails = lambda argv, *fragments: fails_with_one_line(capsys, tune, argv, *fragments)  # noqa: E731
    run = tmp_path / "run"
    fails(tune_args(str(tmp_path / "none.pt"), chats, run), "--base_model_path: no checkpoint at")
    no_messages = tmp_path / "plain.jsonl"
    no_messages.write_text('{"text": "hello"}\n')
    fails(tune_args(base, str(no_messages), run), "messages", "text")
    unknown = tmp_path / "roles.jsonl"
    unknown.write_text(json.dumps({"messages": [{"role": "bot", "content": "hi"}]}) + "\n")
    fails(tune_args(base, str(unknown), run), "bot")
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    fails(tune_args(base, str(empty), run), "holds no conversations")
    fails(tune_args(base, chats, run, "--merge_path", str(run / "lora.pt"), "--checkpoint_path", str(run / "lora.pt")),
          "--merge_path")
    # a LoRA checkpoint trained on another base: here the same base with one weight changed
    other_base = tmp_path / "other.pt"
    state = load_checkpoint(base, "pretrain")
    state.pop("sha256")
    state["model"]["output_norm.weight"] = state["model"]["output_norm.weight"] * 2
    save_checkpoint(state, str(other_base))
    for module in (generate, beam_search):
        fails_with_one_line(capsys, module, ["--checkpoint_path", str(other_base), "--lora_path", str(out / "lora.pt"),
                                             "--device", "cpu", "--prompt", "x"], "adapts another base model")
    fails(tune_args(str(other_base), chats, out, "--resume"), "adapts another base model")


def test_chat_flags_in_scripts(certain, monkeypatch, capsys):
    """Piped lines are one conversation; /reset starts another; beam search answers a user turn."""
    base, lora = certain.base, certain.lora
    monkeypatch.setattr(sys, "stdin", io.StringIO("Say stone.\nAgain.\n/reset\nSay stone.\n"))
    answers = generate.main(generate.parse_args(["--checkpoint_path", base, "--lora_path", lora, "--device", "cpu",
                                                 "--temperature", "0", "--max_tokens", "16"]))
    printed = capsys.readouterr().out
    tok = ChatTokenizer(load_encoding("bytes"))
    # after /reset the first question is asked afresh: the same answer as at first
    texts = [tok.decode(a) for a in answers]
    assert texts == [CHAT_ANSWER] * 3
    assert "> Say stone.\n" in printed and "(a new conversation)" in printed
    found = beam_search.main(beam_search.parse_args(["--checkpoint_path", base, "--lora_path", lora, "--device",
                                                     "cpu", "--prompt", "Say stone.", "--beam_width", "4",
                                                     "--num_candidates", "2", "--max_tokens", "12"]))[0]
    assert found[0].finished and found[0].tokens[-1] == tok.im_end
    assert capsys.readouterr().out.split("\n")[1] == CHAT_ANSWER  # the best candidate, without its <|im_end|>


def test_a_chat_longer_than_the_cache_slides_on(certain):
    """Turns keep coming after the conversation outgrows --context_length: the oldest tokens slide out of
    the ring and every turn is still answered."""
    loaded = load_for_inference(certain.base, torch.device("cpu"), certain.lora)
    decoder = Decoder(loaded.model, 24, 1, Sampling(temperature=0.0), Sampler(torch.device("cpu"), 0), False)
    chat = Conversation(loaded, decoder, "Be brief.")
    answers = [chat.reply(text, max_tokens=8) for text in ("Say apple.", "Again.", "Say river.", "Again.")]
    assert [loaded.chat.decode(a) for a in answers] == [CHAT_ANSWER] * 4 and decoder.next_position > 24 * 2
