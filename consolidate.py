"""Make one checkpoint file of a sharded one (pretrain.py's --checkpoint_format sharded, the default at
--ddp_sharding_level 2 and 3 under torchrun).

    python consolidate.py --checkpoint_path ./checkpoints/checkpoint.pt --output_path ./checkpoints/whole.pt

Reads every rank's shards in this one process (torch.distributed.checkpoint reshards them) after checking
each file against its recorded hash, and writes the file a one-process run would have saved: whole weights
and torch.optim.Adafactor-format optimizer state beside the run's step, sampler, RNG streams and flags. So
generate.py, beam_search.py, export.py and instruction-tune.py read it, and pretrain.py --resume continues it.
"""

from __future__ import annotations

import os

from checkpoint import SHARDED_RESUME_ENTRIES, load_checkpoint
from common import ArgumentParser, UserError, run_main
from files import check_writable
from sharded_checkpoint import consolidate, is_sharded


def parse_args(argv=None):
    p = ArgumentParser(description="Make one checkpoint file of a sharded one.")
    p.add_argument("--checkpoint_path", required=True, help="the sharded checkpoint's file (the one naming its shards)")
    p.add_argument("--output_path", required=True, help="the checkpoint file to write (must not exist)")
    return p.parse_args(argv)


def main(args) -> dict:
    state = load_checkpoint(args.checkpoint_path, "pretrain", required=())
    if not is_sharded(state):
        raise UserError(f"--checkpoint_path: {args.checkpoint_path} is already one file; nothing to consolidate")
    load_checkpoint(args.checkpoint_path, "pretrain", required=SHARDED_RESUME_ENTRIES[:4])
    if os.path.exists(args.output_path):
        raise UserError(f"--output_path: {args.output_path} exists; choose a new file")
    check_writable(os.path.dirname(os.path.abspath(args.output_path)), "--output_path")
    whole = consolidate(args.checkpoint_path, state, args.output_path)
    parameters = sum(v.numel() for v in whole["model"].values())
    print(f"wrote {args.output_path}: step {whole.get('step', 0):,}, {parameters:,} weights from "
          f"{state['sharded']['world_size']} processes' shards")
    return whole


if __name__ == "__main__":
    run_main(main, parse_args)
