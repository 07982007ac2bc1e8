#!/usr/bin/env bash
# The GPU checks of the pretraining, scale-out, generation, speed and instruction-tuning work: about 10 minutes
# on one H200 for both parts, estimated (8 were measured before instruction tuning was added). Prints a table
# per step and writes every log under $OUT (or ./gpu_check).
#   bash tests/gpu_check.sh                 # on the GPU machine: PART=bench, then PART=runs
#   PART=bench bash tests/gpu_check.sh      # CUDA-only tests and bench.py (PROFILE=1: also traces;
#                                           # COMPARE=1: also flash/efficient attention, dropout 0 and
#                                           # an autotuned decode step)
#   PART=runs bash tests/gpu_check.sh       # pretraining, generation, beam search, torchrun levels,
#                                           # instruction tuning, chat, packed vs padded rows
#   DEVICE=cpu TINY=1 PYTHON=.venv/bin/python bash tests/gpu_check.sh   # dry run on a CPU, tiny shapes
# Needs torch, tiktoken, numpy, tqdm, tensorboard, pytest (not datasets: it uses the builtin corpus).
set -uo pipefail
cd "$(dirname "$0")/.."
out=${OUT:-./gpu_check}
device=${DEVICE:-cuda}
py=${PYTHON:-python3}  # on the GPU machine, python3 is the one with torch
part=${PART:-all}
mkdir -p "$out"
export PYTHONUNBUFFERED=1
status=0
step() {  # step NAME COMMAND...: run, keep the log, remember failures, go on
    local name=$1; shift
    echo "== $name: $*"
    if ! "$@" > "$out/$name.log" 2>&1; then echo "   FAILED (see $out/$name.log)"; tail -n 5 "$out/$name.log"; status=1; fi
    grep -E '^(mode|clients|train|decode|tokenize|pack|serve|step|epoch|model:|data:|device:)|passed|failed|skipped' "$out/$name.log" | tail -n 12
}

if [ "${TINY:-0}" = 1 ]; then
    shape=(--embedding_dimensions 64 --num_attention_heads 4 --num_hidden_layers 2)
    train_batch=(--batch_size 2 --tokens_per_sample 64)
    iters=(--iterations 2 --warmup_iterations 1)
    decode=(--max_tokens 16)
    compile=off
else
    shape=()  # the Small shape: width 1024, 16 heads, 24 layers, vocabulary 50,257
    train_batch=()  # batch 16 x 1024 tokens
    iters=(--iterations 10 --warmup_iterations 3)
    decode=()  # 256 tokens after 16
    compile=on
fi
"$py" -c "import torch; print('torch', torch.__version__, torch.cuda.get_device_name() if torch.cuda.is_available() else 'no GPU')" | tee "$out/versions.txt"

profile_train=() profile_decode=()
if [ "${PROFILE:-0}" = 1 ]; then  # top ops printed in the logs, Chrome traces beside them
    profile_train=(--profile_path "$out/train-trace.json")
    profile_decode=(--profile_path "$out/decode-trace.json")
fi

if [ "$part" = all ] || [ "$part" = bench ]; then
# What only a GPU can check: the CUDA-graph decoder equals the eager one, the batched engine equals one
# request at a time (skipped on a CPU).
step test_gpu "$py" -m pytest -q -p no:cacheprovider tests/test_gpu.py
# Speed and memory (bench.py): training, with activation checkpointing, with torch's Adafactor; decoding.
step bench_train "$py" bench.py train --device "$device" --compile "$compile" "${shape[@]}" "${train_batch[@]}" \
    "${iters[@]}" "${profile_train[@]}"
step bench_train_ac "$py" bench.py train --device "$device" --compile "$compile" --activation_checkpointing \
    "${shape[@]}" "${train_batch[@]}" "${iters[@]}"
step bench_train_torch_adafactor "$py" bench.py train --device "$device" --compile "$compile" --optimizer torch --momentum 0 \
    "${shape[@]}" "${train_batch[@]}" "${iters[@]}"
step bench_decode "$py" bench.py decode --device "$device" --compile "$compile" "${shape[@]}" "${decode[@]}" \
    --iterations 3 --warmup_iterations 1 "${profile_decode[@]}"
# Serving (engine.py, no HTTP: the GPU machine has no web stack): 32 streaming requests from 1, 4 and 16
# clients, batched against one at a time.
step bench_serve_engine "$py" bench.py serve --through engine --device "$device" --compile "$compile" "${shape[@]}" \
    --requests 32 "${decode[@]}"
if [ "${COMPARE:-0}" = 1 ]; then  # what the attention kernel and dropout cost: one training bench each
    backends=(flash efficient)
    [ "$device" = cpu ] && backends=()  # the CPU's fused kernels take no dropout
    for backend in "${backends[@]}"; do
        step "bench_train_$backend" "$py" bench.py train --device "$device" --compile "$compile" \
            --attention_backend "$backend" "${shape[@]}" "${train_batch[@]}" "${iters[@]}"
    done
    step bench_train_no_dropout "$py" bench.py train --device "$device" --compile "$compile" --dropout 0 \
        "${shape[@]}" "${train_batch[@]}" "${iters[@]}"
    step bench_decode_autotune "$py" bench.py decode --device "$device" --compile "$compile" "${shape[@]}" \
        "${decode[@]}" --decode_batch_size 1 --decode_compile_mode autotune --iterations 3
fi
fi
[ "$part" = bench ] && { echo "gpu_check: $([ $status = 0 ] && echo all steps passed || echo some steps FAILED)"; exit $status; }

# A short pretraining of the model shape on the builtin corpus (bf16, compile), then generation from it.
run=(--dataset builtin --token_encoding bytes --dataset_path "$out/datasets" --device "$device" "${shape[@]}"
     --batch_size 8 --gradient_accumulation_steps 2 --tokens_per_sample 256 --samples_per_epoch 64 --num_epochs 2
     --eval_interval 2 --eval_samples 16 --warmup_steps 2 --seed 0 --compile "$compile")
rm -rf "$out/single"
step pretrain "$py" pretrain.py "${run[@]}" --checkpoint_path "$out/single/checkpoint.pt" --run_dir_path "$out/single/runs"
step generate "$py" generate.py --checkpoint_path "$out/single/checkpoint.pt" --device "$device" --compile "$compile" \
    --prompt "The class statement" --max_tokens 64 --seed 0
step beam_search "$py" beam_search.py --checkpoint_path "$out/single/checkpoint.pt" --device "$device" \
    --prompt "The class statement" --max_tokens 16 --beam_width 4

# Instruction tuning of that model with LoRA on the builtin conversations (bf16, compile, packed rows with
# their block-diagonal mask), chatting with it (the merged model in a CUDA-graph decoder), and its speed:
# conversation tokens/s of packed rows against one conversation per padded row.
tune=(--dataset builtin --dataset_path "$out/datasets" --device "$device" --compile "$compile" --mask_input
      --max_tokens_per_sample 512 --batch_size 8 --gradient_accumulation_steps 2 --num_epochs 1 --eval_samples 16
      --learning_rate 3e-2 --warmup_steps 2 --seed 0)
step instruction_tune "$py" instruction-tune.py --base_model_path "$out/single/checkpoint.pt" "${tune[@]}" \
    --checkpoint_path "$out/single/lora.pt" --run_dir_path "$out/single/lora-runs" --merge_path "$out/single/chat.pt"
step chat "$py" generate.py --checkpoint_path "$out/single/checkpoint.pt" --lora_path "$out/single/lora.pt" \
    --device "$device" --compile "$compile" --prompt 'What does the "del" statement do?' --max_tokens 64 --seed 0
step bench_pack "$py" bench.py pack --device "$device" --compile "$compile" --token_encoding bytes "${shape[@]}" \
    --batch_size 8 --tokens_per_sample 1024 --iterations 5 --warmup_iterations 2

# torchrun with one process at every sharding level.
for level in 0 2 3; do
    rm -rf "$out/level$level"
    step "torchrun_level$level" "$py" -m torch.distributed.run --standalone --nproc-per-node 1 pretrain.py "${run[@]}" \
        --ddp_sharding_level "$level" --checkpoint_path "$out/level$level/checkpoint.pt" --run_dir_path "$out/level$level/runs"
done
step torchrun_tune_level3 "$py" -m torch.distributed.run --standalone --nproc-per-node 1 instruction-tune.py \
    --base_model_path "$out/single/checkpoint.pt" "${tune[@]}" --ddp_sharding_level 3 \
    --checkpoint_path "$out/level3/lora.pt" --run_dir_path "$out/level3/lora-runs"
echo "gpu_check: $([ $status = 0 ] && echo all steps passed || echo some steps FAILED)"
exit $status
