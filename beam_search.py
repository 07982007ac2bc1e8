"""Beam search over whole continuations of a prompt with a LightGPT checkpoint.

    python beam_search.py --prompt "The capital of France" --beam_width 16 --num_candidates 3
    echo "Once upon a time" | python beam_search.py
    python beam_search.py --lora_path ./checkpoints/lora_instruction.pt --prompt "What is a class?"

All beams live in one batch and advance together: one forward per step over a KV cache whose rows are
reordered to follow the surviving beams. A beam that produces end-of-text is set aside as a
candidate. The search stops at --max_tokens, when no beam is left, or when no live beam can still beat
the worst of the --num_candidates best candidates. Candidates are ranked by their length-normalised
log-probability: total / length ** --length_penalty (0 ranks by total; 1, the default, by mean per token).
With a chat model (--lora_path, or a merged checkpoint) each prompt is a user turn and an answer ends
at <|im_end|> instead of end-of-text.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from common import ArgumentParser, UserError, add_system_args, float_in, positive_int, resolve_device, run_main
from generate import (add_inference_args, decode_text, encode_prompt, load_for_inference, prefill, prompts,
                      setup_kv_cache)
from model import GPT


@dataclass
class Candidate:
    tokens: list[int]  # generated tokens, end-of-text included when the beam finished
    total: float  # sum of the tokens' log-probabilities
    score: float  # total / len(tokens) ** length_penalty, the ranking key
    finished: bool


@torch.inference_mode()
def beam_search(model: GPT, prompt_ids: list[int], end: int, beam_width: int, num_candidates: int,
                max_tokens: int, context_length: int, length_penalty: float = 1.0) -> list[Candidate]:
    """The num_candidates best continuations of prompt_ids, best first; a continuation ends at `end`."""
    device = model.token_embeddings.weight.device
    W, V = beam_width, model.config.vocabulary_size
    setup_kv_cache(model, W, context_length,
                   f"a KV cache for --beam_width {W} x --context_length {context_length} tokens")
    P = len(prompt_ids)
    idx = torch.tensor([prompt_ids], device=device).expand(W, P)
    logits = prefill(model, idx).float()  # (W, V)
    # The W rows start identical: only the first may expand, or the beams would be W copies.
    scores = torch.full((W,), float("-inf"), device=device)
    scores[0] = 0.0
    beams: list[list[int]] = [[] for _ in range(W)]
    kept: list[Candidate] = []

    def normalised(total: float, length: int) -> float:
        return total / length**length_penalty

    for length in range(1, max_tokens + 1):
        candidates = (scores[:, None] + torch.log_softmax(logits, dim=-1)).flatten()  # (W * V,)
        top_scores, top_index = candidates.topk(W)
        live = []  # (total, parent row, token)
        for total, index in zip(top_scores.tolist(), top_index.tolist()):
            if total == float("-inf"):
                break
            parent, token = divmod(index, V)
            if token == end:
                tokens = beams[parent] + [token]
                kept.append(Candidate(tokens, total, normalised(total, length), True))
            else:
                live.append((total, parent, token))
        kept.sort(key=lambda c: c.score, reverse=True)
        del kept[num_candidates:]
        if not live:
            break
        if length == max_tokens:  # out of room: the live beams compete as they are
            kept.extend(Candidate(beams[p] + [t], s, normalised(s, length), False) for s, p, t in live)
            break
        if len(kept) == num_candidates:
            # A live beam's total can only fall; its best possible score is at the longest length.
            best_possible = max(s for s, _, _ in live) / (max_tokens**length_penalty)
            if best_possible <= kept[-1].score:
                break
        rows = [p for _, p, _ in live] + [live[0][1]] * (W - len(live))  # pad with a dead copy
        model.kv_cache.reorder(torch.tensor(rows, device=device))
        beams = [beams[p] + [t] for _, p, t in live] + [[]] * (W - len(live))
        scores = torch.tensor([s for s, _, _ in live] + [float("-inf")] * (W - len(live)), device=device)
        tokens = torch.tensor([t for _, _, t in live] + [end] * (W - len(live)), device=device).view(W, 1)
        logits = model(tokens, input_pos=torch.tensor([P + length - 1], device=device))[:, -1].float()
    kept.sort(key=lambda c: c.score, reverse=True)
    return kept[:num_candidates]


def parse_args(argv=None):
    p = ArgumentParser(description="Beam search with LightGPT.")
    add_inference_args(p, max_tokens=100)
    add_system_args(p, compile_help=None, seed_help=None)  # beam search is deterministic and runs eagerly
    p.add_argument("--num_candidates", type=positive_int, default=3, help="best sequences to print")
    p.add_argument("--beam_width", type=positive_int, default=16, help="sequences kept alive at each step")
    p.add_argument("--length_penalty", type=float_in(0, 10), default=1.0,  # length ** 1000 would overflow
                   help="rank by total / length ** this, in [0, 10]")
    return p.parse_args(argv)


def main(args) -> list[list[Candidate]]:
    if args.num_candidates > args.beam_width:
        raise UserError(f"--num_candidates {args.num_candidates} is larger than --beam_width {args.beam_width}")
    loaded = load_for_inference(args.checkpoint_path, resolve_device(args.device), args.lora_path, args.system)
    end = loaded.eot if loaded.chat is None else loaded.chat.im_end  # a chat model's answer ends its turn
    results = []
    for text in prompts(args.prompt):
        found = beam_search(loaded.model, encode_prompt(loaded, text, args.system), end, args.beam_width,
                            args.num_candidates, args.max_tokens, args.context_length, args.length_penalty)
        for rank, c in enumerate(found, 1):
            body = decode_text(loaded.encoding, [t for t in c.tokens if t != end])
            ending = "" if c.finished else " (cut at --max_tokens)"
            print(f"[{rank}] log-probability {c.total:.3f} total, {c.score:.3f} normalised, "
                  f"{len(c.tokens)} tokens{ending}")
            print(body, flush=True)
        results.append(found)
    return results


if __name__ == "__main__":
    run_main(main, parse_args)
