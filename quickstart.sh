#!/usr/bin/env bash
# LightGPT in one command: set up a virtual environment, train a small model offline, sample from it,
# instruction-tune it with LoRA and chat with it.
#
#   bash quickstart.sh                         # the README's quick start: minutes on a CPU (7 on 2 shared cores)
#   TINY=1 bash quickstart.sh                  # the same steps at a tiny shape, in seconds (CI runs this)
#   QUICKSTART_DRY_RUN=1 bash quickstart.sh    # print the commands it would run and run none
#
# The steps: 1. create .venv with $PYTHON, or reuse it; 2. install PyTorch, unless it imports there
# already; 3. install requirements.txt (on the CPU, also build the compiled CPU kernels: cpu_kernels.py); 4. pretrain on the builtin corpus with byte tokens
# (pretrain.py --model quickstart: nothing is downloaded); 5. sample from the checkpoint with generate.py;
# 6. instruction-tune it with LoRA on the builtin conversations (instruction-tune.py --dataset builtin);
# 7. ask the base model and the tuned one the same question, then chat with the tuned one for two turns;
# then say where the checkpoints and the TensorBoard runs went and what to try next.
#
# PyTorch: with an NVIDIA GPU (nvidia-smi -L lists one), PyPI's default build, which is the CUDA one.
# Without one, the CPU build only, never PyPI's default (the multi-GB CUDA build on Linux): a wheel on
# pip's local --find-links first (pip install --no-index), else PyTorch's CPU index; if neither works it
# stops with one line saying how to install it by hand. On macOS, PyPI's build (CPU and MPS) is the one.
#
# Every run trains a new model into its own files, ./checkpoints/quickstart-<date>-<time>.pt and
# ./runs/quickstart-<date>-<time>, so running the script again never fails on, or touches, an earlier
# run's checkpoint (delete old runs by hand). The token files in ./datasets are reused.
# On a GPU it trains a larger shape for longer: width 512, 8 heads, 8 layers, 4.2M tokens.
#
# Environment overrides:
#   PYTHON=python3.12       the interpreter that creates the environment (default python3; 3.10 or newer)
#   VENV=path               the environment to create or reuse (default .venv)
#   DEVICE=cpu|cuda|mps     where to train (default cuda when nvidia-smi -L lists a GPU, else cpu);
#                           it also picks the PyTorch build
#   TORCH_SPEC=spec         install this PyTorch instead, e.g. torch==2.6.0 (needs no GPU check)
#   TORCH_INDEX_URL=url     ... from this index, e.g. https://download.pytorch.org/whl/cu126
#   TINY=1                  a tiny shape and a few steps, for CI (about 20 s once set up)
#   RUN_NAME=name           name the checkpoint and run folder (default quickstart-<date>-<time>)
#   QUICKSTART_DRY_RUN=1    print every command (every way of installing PyTorch, in order), run none
set -euo pipefail
cd "$(dirname "$0")"

python=${PYTHON:-python3}
venv=${VENV:-.venv}
py=$venv/bin/python
dry=${QUICKSTART_DRY_RUN:-0}
cpu_index=https://download.pytorch.org/whl/cpu
SECONDS=0

say() { printf '\n== %s\n' "$*"; }
die() { printf 'quickstart.sh: error: %s\n' "$*" >&2; exit 1; }
show() {  # print a command as one line of shell, quoting the arguments that need it
    local line=+ a
    for a in "$@"; do
        # a plain word as it is; anything else in single quotes, a ' inside written as '\''
        if [[ $a =~ ^[][A-Za-z0-9_./:=+@%,-]+$ ]]; then line+=" $a"; else line+=" '${a//\'/\'\\\'\'}'"; fi
    done
    printf '%s\n' "$line"
}
run() {  # print a command, then run it (a dry run only prints it)
    show "$@"
    [ "$dry" = 1 ] || "$@"
}
has_nvidia_gpu() { nvidia-smi -L 2>/dev/null | grep -q '^GPU '; }

device=${DEVICE:-$(has_nvidia_gpu && echo cuda || echo cpu)}

torch_tries() {  # the ways to install PyTorch, as pip install arguments, one a line, tried in order
    if [ -n "${TORCH_SPEC:-}${TORCH_INDEX_URL:-}" ]; then
        echo "${TORCH_SPEC:-torch}${TORCH_INDEX_URL:+ --index-url $TORCH_INDEX_URL}"
    elif [[ $device == cuda* ]] || [ "$(uname -s)" = Darwin ]; then
        echo "torch"  # PyPI's build: CUDA on Linux, CPU and MPS on macOS
    else  # the CPU build only: PyPI's default on Linux is the CUDA one, gigabytes a CPU cannot use
        echo "--no-index --no-deps torch"  # a local wheel; its dependencies come with requirements.txt
        echo "torch --index-url $cpu_index --timeout 15 --retries 0"
    fi
}

install_torch() {
    if [ -x "$py" ] && "$py" -c 'import torch' 2>/dev/null; then
        echo "PyTorch $("$py" -c 'import torch; print(torch.__version__)') is installed in $venv already; skipping"
        return
    fi
    local try args first=1
    while read -r try; do
        read -ra args <<< "$try"
        [ $first = 1 ] || [ "$dry" != 1 ] || echo "  (if that fails)"
        first=0
        show "$py" -m pip install "${args[@]}"
        [ "$dry" = 1 ] && continue  # a dry run shows every way, in order
        "$py" -m pip install "${args[@]}" < /dev/null && return
        echo "   that did not work"
    done <<< "$(torch_tries)"
    [ "$dry" = 1 ] && return
    if [[ $device == cuda* ]] || [ -n "${TORCH_SPEC:-}${TORCH_INDEX_URL:-}" ] || [ "$(uname -s)" = Darwin ]; then
        die "pip could not install PyTorch ($(torch_tries)); install it by hand (https://pytorch.org/get-started/locally/), then run bash quickstart.sh again"
    fi
    die "could not install PyTorch's CPU build: no wheel on pip's local find-links, and none from $cpu_index (unreachable, or no build for this Python); install it by hand ($py -m pip install torch --index-url $cpu_index, or pip install a CPU wheel file), then run bash quickstart.sh again"
}

python_at_least_3_10() {
    "$1" -c 'import sys; sys.exit(sys.version_info < (3, 10))' 2>/dev/null
}

# ----------------------------------------------------------------------------- set-up

say "1/7 Python environment: $venv"
if [ -x "$py" ]; then
    python_at_least_3_10 "$py" || die "$venv holds Python $("$py" -V 2>&1); LightGPT needs 3.10 or newer: remove $venv and set PYTHON="
    echo "reusing $venv ($("$py" -V 2>&1))"
else
    command -v "$python" > /dev/null || die "no $python on PATH; set PYTHON= to a Python 3.10 or newer"
    python_at_least_3_10 "$python" || die "LightGPT needs Python 3.10 or newer; $python is $("$python" -V 2>&1); set PYTHON= to a newer one"
    run "$python" -m venv "$venv" || die "$python could not create $venv (on Debian and Ubuntu: apt install python3-venv)"
fi
if [ "$dry" != 1 ] && ! "$py" -m pip --version > /dev/null 2>&1; then
    die "$venv has no pip (on Debian and Ubuntu: apt install python3-venv, then remove $venv and run again)"
fi

say "2/7 PyTorch for device $device"
install_torch

say "3/7 requirements.txt"
# Pinning torch to the installed build keeps it (a CPU build stays a CPU build) and brings in any of its
# dependencies a --no-deps install left out.
if ! torch_version=$("$py" -c 'import importlib.metadata as m; print(m.version("torch"))' 2>/dev/null); then
    [ "$dry" = 1 ] || die "PyTorch is not installed in $venv"
    torch_version="<the installed version>"
fi
run "$py" -m pip install -q -r requirements.txt "torch==$torch_version"
if [ "$device" = cpu ]; then  # RMSNorm and Adafactor compiled for this CPU: once (about 15 s), then cached by torch
    run "$py" cpu_kernels.py || echo "quickstart.sh: no compiled CPU kernels (the line above says why); training takes the Python path, a little slower"
fi

# ----------------------------------------------------------------------------- the run

epochs=4
if [ "${TINY:-0}" = 1 ]; then
    shape=(--embedding_dimensions 64 --num_attention_heads 4 --num_hidden_layers 2 --batch_size 8
           --tokens_per_sample 64 --short_tokens_per_sample 16 --samples_per_epoch 128 --eval_samples 32
           --warmup_steps 4)
    epochs=2 max_tokens=64 chat_tokens=64
    tune=(--max_tokens_per_sample 64 --batch_size 16 --eval_samples 16 --num_epochs 1)
elif [[ $device == cuda* ]]; then  # a GPU: a larger shape, 4 epochs of 2048 x 512 tokens (128 for 85% of them)
    shape=(--embedding_dimensions 512 --num_attention_heads 8 --num_hidden_layers 8 --batch_size 16
           --gradient_accumulation_steps 2 --tokens_per_sample 512 --short_tokens_per_sample 128
           --samples_per_epoch 2048 --learning_rate 1e-2 --warmup_steps 50)
    max_tokens=300 chat_tokens=400
    tune=(--max_tokens_per_sample 512 --batch_size 16)
else  # the quick start's own: width 128, 4 heads, 4 layers, 4 epochs of 9,000 samples (64 bytes, the last 15% 256)
    shape=()
    max_tokens=200 chat_tokens=400
    tune=(--max_tokens_per_sample 256 --batch_size 16)
fi
# LoRA on the builtin conversations: three passes over rows of packed conversations, only the answers
# learned, a learning rate for a short run (the card's defaults, 5e-4 and 64-row steps, suit SmolTalk on
# a GPU). At the CPU shape about 4 minutes; then most sampled answers end at <|im_end|> within 400 tokens.
tune_flags=(--dataset builtin --device "$device" --mask_input --gradient_accumulation_steps 1 --num_epochs 3
            --learning_rate 3e-2 --warmup_steps 5 --seed 0 "${tune[@]}")
train_flags=(--model quickstart --device "$device" ${shape[@]+"${shape[@]}"})

name=${RUN_NAME:-quickstart-$(date +%Y%m%d-%H%M%S)}
base=$name n=1
while [ -e "checkpoints/$name.pt" ] || [ -e "runs/$name" ]; do  # a fresh name, even twice in one second
    n=$((n + 1)) name=$base-$n
done
checkpoint=./checkpoints/$name.pt run_dir=./runs/$name
lora=./checkpoints/$name-chat.pt lora_run_dir=./runs/$name-chat

say "4/7 pretraining on the builtin corpus (offline), $device"
run "$py" pretrain.py "${train_flags[@]}" --num_epochs "$epochs" --checkpoint_path "$checkpoint" --run_dir_path "$run_dir"

say "5/7 a sample from the model"
run "$py" generate.py --checkpoint_path "$checkpoint" --device "$device" --prompt "The class statement" \
    --max_tokens "$max_tokens" --seed 0

say "6/7 instruction tuning with LoRA on the builtin conversations (offline), $device"
run "$py" instruction-tune.py --base_model_path "$checkpoint" "${tune_flags[@]}" --checkpoint_path "$lora" \
    --run_dir_path "$lora_run_dir"

say "7/7 the same question to the base model (it continues the text) and to the tuned one (it answers)"
question='What does the "del" statement do?'
run "$py" generate.py --checkpoint_path "$checkpoint" --device "$device" --prompt "$question" \
    --max_tokens "$max_tokens" --seed 0
run "$py" generate.py --checkpoint_path "$checkpoint" --lora_path "$lora" --device "$device" --prompt "$question" \
    --max_tokens "$chat_tokens" --seed 0
echo "a conversation of two turns, piped (each line a user turn; the answers stop at <|im_end|>):"
if [ "$dry" = 1 ]; then
    echo "+ printf '%s\n' 'Tell me about the \"assert\" statement.' 'Tell me more.' | $py generate.py" \
        "--checkpoint_path $checkpoint --lora_path $lora --device $device --max_tokens $chat_tokens --seed 0"
else
    printf '%s\n' 'Tell me about the "assert" statement.' 'Tell me more.' | "$py" generate.py \
        --checkpoint_path "$checkpoint" --lora_path "$lora" --device "$device" --max_tokens "$chat_tokens" --seed 0
fi

if [ "$dry" = 1 ]; then say "dry run: nothing ran"; else say "done in $((SECONDS / 60)) min $((SECONDS % 60)) s"; fi
cat << EOF
checkpoint:   $checkpoint   (LoRA: $lora)
TensorBoard:  $run_dir and $lora_run_dir    (view them: $venv/bin/tensorboard --logdir ./runs)
next:
  $py generate.py --checkpoint_path $checkpoint --device $device        # prompts, one a line
  $py generate.py --checkpoint_path $checkpoint --lora_path $lora --device $device   # chat; /reset starts over
  $py beam_search.py --checkpoint_path $checkpoint --device $device --prompt "The return statement" --max_tokens 40
  $py serve.py --checkpoint_path $checkpoint --lora_path $lora --device $device   # OpenAI API + chat page: http://127.0.0.1:8000
  $py export.py --checkpoint_path $checkpoint --lora_path $lora --output_path ./exports/$name-chat   # safetensors folder
  $py pretrain.py ${train_flags[*]} --num_epochs $((epochs * 2)) --resume --checkpoint_path $checkpoint --run_dir_path $run_dir   # train on
  $py pretrain.py --model small        # the Small model on FineWeb: a download and a GPU
  $py instruction-tune.py --base_model_path ./checkpoints/checkpoint.pt   # LoRA on SmolTalk: a download and a GPU
  bash .ci/run                                        # the tests
EOF
