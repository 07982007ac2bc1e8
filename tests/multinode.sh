#!/usr/bin/env bash
# Multi-node pretraining for real, on one machine: two network namespaces joined by a veth pair act as
# two hosts, each runs one torchrun node (--nnodes 2, gloo on the CPU, rendezvous on the first host's
# address), and the checkpoint they write must equal the one a 2-process single-node run writes.
# Needs root and iproute2. Traffic stays inside the two namespaces. Cleans up on every exit path.
# Usage: bash tests/multinode.sh [PYTHON]
set -euo pipefail
cd "$(dirname "$0")/.."
py=${1:-python}
id=$$
ns0="lgpt-n0-$id" ns1="lgpt-n1-$id"
if0="lgv0-$id" if1="lgv1-$id"
addr0=10.231.$((id % 200)).1 addr1=10.231.$((id % 200)).2
work=$(mktemp -d)
pids=()

cleanup() {
    for pid in "${pids[@]}"; do kill "$pid" 2>/dev/null || true; done
    ip netns pids "$ns0" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns pids "$ns1" 2>/dev/null | xargs -r kill -9 2>/dev/null || true
    ip netns del "$ns0" 2>/dev/null || true
    ip netns del "$ns1" 2>/dev/null || true  # deleting a namespace removes its end of the veth pair
    rm -rf "$work"
}
trap cleanup EXIT
trap 'exit 130' INT TERM

ip netns add "$ns0"
ip netns add "$ns1"
ip link add "$if0" type veth peer name "$if1"
ip link set "$if0" netns "$ns0"
ip link set "$if1" netns "$ns1"
ip -n "$ns0" addr add "$addr0/24" dev "$if0"
ip -n "$ns1" addr add "$addr1/24" dev "$if1"
for ns in "$ns0" "$ns1"; do ip -n "$ns" link set lo up; done
ip -n "$ns0" link set "$if0" up
ip -n "$ns1" link set "$if1" up

train=(pretrain.py --dataset builtin --token_encoding bytes --dataset_path "$work/datasets" --device cpu
       --embedding_dimensions 27 --num_attention_heads 3 --num_hidden_layers 2 --dropout 0
       --batch_size 4 --gradient_accumulation_steps 2 --tokens_per_sample 32 --samples_per_epoch 16
       --num_epochs 3 --eval_interval 3 --eval_samples 16 --warmup_steps 2 --seed 11 --ddp_sharding_level 2)
export OMP_NUM_THREADS=1 PYTHONUNBUFFERED=1

echo "multinode: reference run, 2 processes on one node"
"$py" -m torch.distributed.run --standalone --nproc-per-node 2 "${train[@]}" \
    --checkpoint_path "$work/single/checkpoint.pt" --run_dir_path "$work/single/runs" > "$work/single.log" 2>&1 \
    || { cat "$work/single.log"; exit 1; }

echo "multinode: 2 nodes x 1 process, rendezvous at $addr0 ($ns0) from $ns1"
for rank in 0 1; do
    ns=$ns0 ifname=$if0
    if [ "$rank" = 1 ]; then ns=$ns1 ifname=$if1; fi
    ip netns exec "$ns" env GLOO_SOCKET_IFNAME="$ifname" timeout 300 "$py" -m torch.distributed.run \
        --nnodes 2 --node-rank "$rank" --nproc-per-node 1 --master-addr "$addr0" --master-port 29471 \
        "${train[@]}" --checkpoint_path "$work/multi/checkpoint.pt" --run_dir_path "$work/multi/runs$rank" \
        > "$work/node$rank.log" 2>&1 &
    pids+=($!)
done
status=0
for pid in "${pids[@]}"; do wait "$pid" || status=1; done
pids=()
if [ "$status" != 0 ]; then
    echo "multinode: a node failed"; tail -n 30 "$work/node0.log" "$work/node1.log"; exit 1
fi
grep -q "2 processes, fsdp level 2" "$work/node0.log" || { echo "multinode: node 0 did not train on 2 processes"; cat "$work/node0.log"; exit 1; }

"$py" - "$work/single/checkpoint.pt" "$work/multi/checkpoint.pt" <<'PY'
import sys
sys.path.insert(0, ".")
from checkpoint import load_checkpoint
from sharded_checkpoint import consolidate, is_sharded

def whole(path):  # level 2 saves sharded: every rank its own shards, on both nodes
    state = load_checkpoint(path, "pretrain", required=())
    if is_sharded(state):
        consolidate(path, state, path + ".whole.pt")
        state = load_checkpoint(path + ".whole.pt", "pretrain")
    return state

a, b = (whole(p) for p in sys.argv[1:3])
assert a["step"] == b["step"] > 0, (a["step"], b["step"])
assert a["model"].keys() == b["model"].keys()
worst = max((a["model"][k] - b["model"][k]).abs().max().item() for k in a["model"])
assert worst <= 1e-6, f"weights differ by {worst}"
print(f"multinode: 2-node checkpoint equals the single-node one (step {a['step']}, max difference {worst:.1e})")
PY
echo "multinode: passed"
