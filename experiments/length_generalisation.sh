#!/usr/bin/env bash
# Length generalisation, NoPE against RoPE and ALiBi: three tiny models that differ only in
# --position_encoding (same builtin corpus, byte tokens, steps and seed; 128-token samples), each
# evaluated by evaluate.py at 0.5x to 4x its training length; then one table and one plot of the three.
# Offline, on a CPU in about 10 minutes (2 cores). docs/evaluation.md ("Length generalisation") shows its output.
#   bash experiments/length_generalisation.sh            # writes ./runs/length/...
#   OUT=path PYTHON=python3 DEVICE=cuda bash experiments/length_generalisation.sh
set -euo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./runs/length}
py=${PYTHON:-.venv/bin/python}
device=${DEVICE:-cpu}
mkdir -p "$out"
for encoding in none rope alibi; do
    rm -f "$out/$encoding.pt"
    "$py" pretrain.py --dataset builtin --token_encoding bytes --device "$device" --position_encoding "$encoding" \
        --embedding_dimensions 128 --num_attention_heads 4 --num_hidden_layers 4 --tokens_per_sample 128 \
        --batch_size 16 --gradient_accumulation_steps 1 --samples_per_epoch 1024 --num_epochs 4 --eval_interval 4 \
        --warmup_steps 50 --learning_rate 2e-2 --seed 0 \
        --checkpoint_path "$out/$encoding.pt" --run_dir_path "$out/runs-$encoding"
    "$py" evaluate.py --checkpoint_path "$out/$encoding.pt" --device "$device" --multiples 0.5,1,1.5,2,3,4 \
        --windows 128 --seed 0 --output_path "$out/eval-$encoding"
done
"$py" - "$out" << 'PYTHON'
import json, sys
out = sys.argv[1]
names = {"none": "NoPE", "rope": "RoPE", "alibi": "ALiBi"}
results = {e: json.load(open(f"{out}/eval-{e}/results.json"))["results"] for e in names}
lengths = [r["length"] for r in results["none"]]
print("| context (tokens) | x trained | " + " | ".join(names.values()) + " |")
print("|---|---|" + "---|" * len(names))
for i, L in enumerate(lengths):
    cells = [f"{results[e][i]['perplexity']:.2f}" for e in names]
    print(f"| {L} | {results['none'][i]['multiple']:g} | " + " | ".join(cells) + " |")
try:
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
except ImportError:
    sys.exit(0)
fig, ax = plt.subplots(figsize=(6, 3.6))
for e, name in names.items():
    ax.plot(lengths, [r["perplexity"] for r in results[e]], marker="o", label=name)
ax.axvline(128, color="gray", linestyle="--", linewidth=1, label="training length")
ax.set_xlabel("context length (tokens)")
ax.set_ylabel("test perplexity")
ax.set_xscale("log", base=2)
ax.set_xticks(lengths, [str(L) for L in lengths])
ax.legend()
ax.set_title("0.8M-parameter byte models on the builtin corpus, trained at 128 tokens", fontsize=9)
fig.tight_layout()
fig.savefig(f"{out}/length_generalisation.png", dpi=110)
print(f"plot: {out}/length_generalisation.png")
PYTHON
