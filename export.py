"""Export a LightGPT model as a folder to share: model.safetensors, config.json and a README.md model card,
the HuggingFace Hub's layout; optionally with a LoRA's adapters merged in, an ONNX graph, and an upload.

    python export.py --checkpoint_path ./checkpoints/quickstart.pt                # -> ./exports/quickstart
    python export.py --checkpoint_path ./checkpoints/quickstart.pt \\
        --lora_path ./checkpoints/quickstart-chat.pt                               # -> ./exports/quickstart-chat
    python export.py --checkpoint_path ./checkpoints/quickstart.pt --overwrite --onnx   # again, with model.onnx
    python export.py --checkpoint_path ./checkpoints/quickstart.pt --output_path ./exports/upload \\
        --push_to_hub you/lightgpt-quickstart                                       # export, then upload

The folder loads with hub.from_pretrained(folder or hub id), and as --checkpoint_path in generate.py,
beam_search.py and evaluate.py. It is built in a temporary folder beside --output_path and renamed into
place once whole: an export that fails or is interrupted leaves no half-written folder. --onnx writes the
prefill forward (token ids -> logits, no cache) with dynamic batch and sequence axes in fp32 and runs it in
onnxruntime against PyTorch; a difference above 1e-4 fails the export.
"""

from __future__ import annotations

import argparse
import contextlib
import importlib.util
import logging
import os
import re
import warnings

import torch

from common import ArgumentParser, UserError, add_model_path_args, first_line, positive_int, run_main
from files import atomic_folder, check_writable, os_reason
from generate import inference_model, model_tokenizer
from hf_tokenizer import HF_INSTALL, hf_available, save_tokenizer
from hub import (CARD_FILE, CONFIG_FILE, MODELING_FILE, ONNX_FILE, WEIGHTS_FILE, from_pretrained, is_hub_id,
                 push_folder, save_pretrained)
from model import GPT
from peft_adapter import default_export_path, peft_base_name, save_peft_adapter

ONNX_TOLERANCE = 1e-4  # the largest |ONNX - PyTorch| logit difference an fp32 export may show
ONNX_CHECK_SHAPES = ((1, 7), (3, 45))  # (batch, tokens) run in both, unlike the traced example's (2, 16)
ONNX_SINGLE_FILE_BYTES = 2**30  # larger weights go to model.onnx.data (protobuf files stop at 2 GiB)


# ----------------------------------------------------------------------------- arguments


def license_id(text: str) -> str:
    if not re.fullmatch(r"[a-z0-9][a-z0-9.\-]*", text):
        raise argparse.ArgumentTypeError(f"expected a lower-case licence id such as apache-2.0 or mit, got {text!r}")
    return text


license_id.__name__ = "a licence id"


def repo_id(text: str) -> str:
    from huggingface_hub.utils import HFValidationError, validate_repo_id

    try:
        validate_repo_id(text)
    except HFValidationError:
        raise argparse.ArgumentTypeError(f"expected a HuggingFace Hub repository id (owner/name), got {text!r}") from None
    return text


repo_id.__name__ = "a repository id"


def parse_args(argv=None):
    p = ArgumentParser(description="Export a LightGPT checkpoint (a LoRA merged in, optionally) as safetensors, "
                                   "config.json and a model card; optionally ONNX and an upload to the HuggingFace Hub.")
    add_model_path_args(p, "its adapters are merged into the exported weights")
    p.add_argument("--output_path", default=None,
                   help="the folder to write (default: ./exports/ and the LoRA's or checkpoint's file name)")
    p.add_argument("--overwrite", action="store_true", help="replace a non-empty --output_path")
    p.add_argument("--license", type=license_id, default="apache-2.0",
                   help="the model card's licence (a HuggingFace licence id)")
    p.add_argument("--onnx", action="store_true",
                   help="also write model.onnx (the prefill forward) and check it against PyTorch with onnxruntime")
    p.add_argument("--onnx_opset", type=positive_int, default=20, help="the ONNX opset of --onnx (18 or above)")
    p.add_argument("--push_to_hub", type=repo_id, default=None, metavar="REPO_ID",
                   help="then upload the folder to this HuggingFace Hub model repository (created if missing; "
                        "the token from HF_TOKEN or hf auth login)")
    p.add_argument("--private", action="store_true", help="create the --push_to_hub repository as private")
    p.add_argument("--base_model", type=repo_id, default=None, metavar="REPO_ID",
                   help="with --lora_path: the base model's HuggingFace Hub id, for the card's base_model (default: "
                        "--checkpoint_path when it is a hub id)")
    p.add_argument("--peft_adapter", action="store_true",
                   help="with --lora_path: write the LoRA as a peft adapter folder for the export of --checkpoint_path "
                        "instead of merging it")
    args = p.parse_args(argv)
    if args.onnx_opset < 18:
        p.error(f"argument --onnx_opset: torch's ONNX exporter needs opset 18 or above, got {args.onnx_opset}")
    if args.private and args.push_to_hub is None:
        p.error("argument --private: it needs --push_to_hub")
    if args.base_model is not None and args.lora_path is None:
        p.error("argument --base_model: it needs --lora_path (a tuned model names its base)")
    if args.peft_adapter and (args.lora_path is None or args.onnx):
        p.error("argument --peft_adapter: it needs --lora_path (the LoRA to write) and no --onnx")
    if args.output_path is None:
        args.output_path = default_export_path(args.lora_path or args.checkpoint_path, "-peft" if args.peft_adapter else "")
    return args


def check_adapter_base(args) -> None:
    """--peft_adapter for an exported folder: one transformers can load (an export of an older LightGPT has no
    modeling file)."""
    folder = args.checkpoint_path
    if args.peft_adapter and os.path.isdir(folder) and not os.path.isfile(os.path.join(folder, MODELING_FILE)):
        raise UserError(f"--checkpoint_path: {folder} has no {MODELING_FILE}, so transformers cannot load it as the "
                        f"adapter's base; export it again (python export.py --checkpoint_path {folder} "
                        f"--output_path NEW_FOLDER)")


def check_output(args) -> None:
    """--output_path: a new or empty folder, or one --overwrite may replace; never the folder exported from."""
    out = args.output_path
    if os.path.exists(out) and not os.path.isdir(out):
        raise UserError(f"--output_path: {out} is a file; name a folder")
    target = os.path.realpath(out)
    for flag, source in (("--checkpoint_path", args.checkpoint_path), ("--lora_path", args.lora_path)):
        if source is not None and os.path.exists(source):
            where = os.path.realpath(source)
            if where == target or where.startswith(target.rstrip(os.sep) + os.sep):
                raise UserError(f"--output_path {out} holds the {flag} {source} (replacing it would delete it); "
                                f"name another folder")
    if os.path.isdir(out) and os.listdir(out) and not args.overwrite:
        raise UserError(f"--output_path: {out} is not empty; pass --overwrite to replace it, or name another folder")
    check_writable(os.path.dirname(os.path.abspath(out)), "--output_path")


# ----------------------------------------------------------------------------- what the folder records


def export_info(state: dict, lora: dict | None, license: str) -> dict:
    """config.json's records beside the architecture: what generate.py and evaluate.py read of a checkpoint
    (tokenizer, end-of-text, special tokens, training records) and where the weights came from."""
    if "export_info" in state:  # re-exporting a folder: its records stand, but for what this export changes
        info = {k: v for k, v in state["export_info"].items() if k != "onnx"}  # only if this export writes one
        if lora is not None:  # the LoRA merged in now: its tokens, its tuning, and the new weights' identity
            info["special_tokens"] = list(lora["special_tokens"])
            tuning = lora.get("args") if isinstance(lora.get("args"), dict) else {}
            info["instruction_tuning"] = {**{k: tuning.get(k) for k in ("dataset", "dataset_subset",
                                                                         "max_tokens_per_sample")},
                                          "lora": {k: lora["lora"][k] for k in ("rank", "alpha")}}
            if isinstance(tuning.get("max_tokens_per_sample"), int):
                info["training_context_length"] = tuning["max_tokens_per_sample"]
            info["lora_sha256"] = lora["sha256"]
        return {**info, "license": license}
    info = {"token_encoding": state["token_encoding"], "eot_id": state["eot_id"]}
    special = (lora or state).get("special_tokens")
    if special:
        info["special_tokens"] = list(special)
    saved = state.get("args") if isinstance(state.get("args"), dict) else {}
    tuning_args = (lora or {}).get("args") if isinstance((lora or {}).get("args"), dict) else {}
    if "tokens_per_sample" in saved:  # a pretraining checkpoint's flags
        info["pretraining"] = {k: saved.get(k) for k in ("dataset", "dataset_subset", "tokens_per_sample")}
        if "start_token" in saved:  # evaluate.py reads each window after it, as the model was trained
            info["pretraining"]["start_token"] = saved["start_token"]
    elif special and "max_tokens_per_sample" in saved:  # a checkpoint merged by instruction-tune.py
        tuning_args = saved
    if tuning_args:
        info["instruction_tuning"] = {k: tuning_args.get(k) for k in ("dataset", "dataset_subset", "max_tokens_per_sample")}
        if lora is not None:
            info["instruction_tuning"]["lora"] = {k: lora["lora"][k] for k in ("rank", "alpha")}
    length = (info.get("instruction_tuning") or info.get("pretraining") or {})
    length = length.get("max_tokens_per_sample", length.get("tokens_per_sample"))
    if isinstance(length, int) and length > 0:
        info["training_context_length"] = length
    info["checkpoint_sha256"] = state["sha256"]
    if lora is not None:
        info["lora_sha256"] = lora["sha256"]
    info["license"] = license
    return info


# ----------------------------------------------------------------------------- ONNX


class Prefill(torch.nn.Module):
    """The model's plain forward, token ids to logits: what model.onnx computes."""

    def __init__(self, model: GPT):
        super().__init__()
        self.model = model

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        return self.model(input_ids)  # (B, T, vocabulary_size)


@contextlib.contextmanager
def quiet_exporter():
    """torch's ONNX exporter logs and warns on stderr (missing torchvision, deprecations); errors still raise."""
    loggers = [logging.getLogger(n) for n in ("torch.onnx", "torch.export", "torch._dynamo", "onnxscript")]
    levels = [lg.level for lg in loggers]
    try:
        for lg in loggers:
            lg.setLevel(logging.ERROR)
        with warnings.catch_warnings(), contextlib.redirect_stdout(open(os.devnull, "w")) as devnull:
            warnings.simplefilter("ignore")
            try:
                yield
            finally:
                devnull.close()
    finally:
        for lg, level in zip(loggers, levels):
            lg.setLevel(level)


def export_onnx(model: GPT, folder: str, opset: int) -> dict:
    """Write model.onnx (fp32, dynamic batch and sequence axes) and run it in onnxruntime on shapes other
    than the traced one against PyTorch; the largest absolute logit difference must be within ONNX_TOLERANCE."""
    missing = [name for name in ("onnx", "onnxscript", "onnxruntime") if importlib.util.find_spec(name) is None]
    if missing:  # onnxscript: torch's exporter builds the graph with it
        raise UserError(f"--onnx needs onnx, onnxscript and onnxruntime ({', '.join(missing)} missing): "
                        f"pip install -r requirements-onnx.txt")
    import numpy as np
    import onnxruntime

    model = model.float().eval()
    path = os.path.join(folder, ONNX_FILE)
    V = model.config.vocabulary_size
    generator = torch.Generator().manual_seed(0)
    example = torch.randint(0, V, (2, 16), generator=generator)
    dims = {0: torch.export.Dim("batch"), 1: torch.export.Dim("sequence")}
    weight_bytes = sum(t.numel() * t.element_size() for t in model.state_dict().values())
    try:
        with quiet_exporter(), torch.no_grad():
            torch.onnx.export(Prefill(model), (example,), path, dynamo=True, opset_version=opset,
                              input_names=["input_ids"], output_names=["logits"], dynamic_shapes=(dims,),
                              external_data=weight_bytes > ONNX_SINGLE_FILE_BYTES, verbose=False)
    except Exception as e:  # the exporter raises many types, with pages of diagnostics
        raise UserError(f"--onnx: torch could not export the model to ONNX opset {opset} ({first_line(e)})") from None
    session = onnxruntime.InferenceSession(path, providers=["CPUExecutionProvider"])
    worst = 0.0
    for shape in ONNX_CHECK_SHAPES:
        ids = torch.randint(0, V, shape, generator=generator)
        with torch.no_grad():
            expected = model(ids).numpy()
        got = session.run(["logits"], {"input_ids": ids.numpy()})[0]
        if got.shape != expected.shape:
            raise UserError(f"--onnx: {ONNX_FILE} gives logits of shape {got.shape} for input {shape}; "
                            f"PyTorch gives {expected.shape}")
        worst = max(worst, float(np.abs(got - expected).max()))
    print(f"{ONNX_FILE}: largest |onnxruntime - PyTorch| logit difference {worst:.2e} at shapes "
          f"{', '.join('x'.join(map(str, s)) for s in ONNX_CHECK_SHAPES)} (fp32, tolerance {ONNX_TOLERANCE:g})")
    if not worst <= ONNX_TOLERANCE:  # NaN fails too
        raise UserError(f"--onnx: {ONNX_FILE} differs from PyTorch by up to {worst:.2e}, more than {ONNX_TOLERANCE:g}; "
                        f"nothing was written")
    return {"opset": opset, "max_abs_diff": worst, "checked_shapes": [list(s) for s in ONNX_CHECK_SHAPES]}


# ----------------------------------------------------------------------------- the folder


# ----------------------------------------------------------------------------- main


def export_tokenizer(model: GPT, folder: str) -> list[str]:
    """The tokenizer as Hugging Face files (tokenizer.json, tokenizer_config.json, a chat model's template)
    when the transformers extra is installed; a note otherwise."""
    if not hf_available():
        print(f"note: transformers is not installed ({HF_INSTALL}); the export has no tokenizer files")
        return []
    info = model.export_info
    return save_tokenizer(folder, info["token_encoding"], info["eot_id"], model.config.vocabulary_size,
                          chat=bool(info.get("special_tokens")))


def main(args) -> str:
    check_output(args)
    check_adapter_base(args)
    model, state, lora = inference_model(args.checkpoint_path, torch.device("cpu"), args.lora_path)  # fp32 on the CPU
    model_tokenizer(model, state, lora, args.checkpoint_path, args.lora_path)  # the same check as generate.py's
    model.export_info = export_info(state, lora, args.license)
    base = args.base_model or (args.checkpoint_path.rstrip("/") if is_hub_id(args.checkpoint_path)
                               and not os.path.exists(args.checkpoint_path) else None)
    if lora is not None and base is not None:  # the card's base_model: a tuned model on the Hub names its base
        model.export_info["base_model"] = base
    where = args.push_to_hub or args.output_path
    from safetensors import SafetensorError

    try:
        with atomic_folder(args.output_path) as tmp:
            if args.peft_adapter:
                base = args.base_model or peft_base_name(args.checkpoint_path)
                save_peft_adapter(lora, tmp, base, where=where, license=args.license)
            else:
                write_export(args, model, tmp, where)
    except (OSError, SafetensorError) as e:  # a full disk, a quota
        why = os_reason(e) if isinstance(e, OSError) else first_line(e)
        raise UserError(f"--output_path: cannot write {args.output_path} ({why}); nothing was written") from None
    if args.peft_adapter:
        if base != args.checkpoint_path.rstrip("/"):
            print(f"note: the adapter's base is {base}: write it with python export.py --checkpoint_path "
                  f"{args.checkpoint_path}")
        return finish(args, f"wrote {args.lora_path} as a peft adapter")
    size = os.path.getsize(os.path.join(args.output_path, WEIGHTS_FILE))
    assert {WEIGHTS_FILE, CONFIG_FILE, CARD_FILE} <= set(os.listdir(args.output_path))
    return finish(args, f"exported {args.lora_path + ' merged into ' if args.lora_path else ''}{args.checkpoint_path} "
                        f"({model.num_parameters():,} parameters, {size / 2**20:,.1f} MiB of safetensors)")


def write_export(args, model: GPT, tmp: str, where: str) -> None:
    """The exported model's files into the temporary folder, read back through every loader's checks."""
    if args.onnx:
        model.export_info = {**model.export_info, "onnx": export_onnx(model, tmp, args.onnx_opset)}
    save_pretrained(model, tmp, where=where)  # model.safetensors, config.json, README.md
    export_tokenizer(model, tmp)
    saved = from_pretrained(tmp)  # read back through the checks every loader runs: bit-identical weights
    weights = model.state_dict()
    assert all(torch.equal(t, weights[k]) for k, t in saved.state_dict().items()), "the weights read back differ"


def finish(args, what: str) -> str:
    """Name the files written, then upload them with --push_to_hub."""
    print(f"{what} to {args.output_path}: {', '.join(sorted(os.listdir(args.output_path)))}")
    if args.push_to_hub:
        url = push_folder(args.output_path, args.push_to_hub, args.private)
        print(f"uploaded to {url}")
    return args.output_path


if __name__ == "__main__":
    run_main(main, parse_args)
