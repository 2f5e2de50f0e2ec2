#!/usr/bin/env bash
# Multi-node training with torchrun: run this same script on every node.
#
#   NNODES=2 NODE_RANK=0 MASTER_ADDR=node0.example MASTER_PORT=29500 GPUS_PER_NODE=8 \
#     experiments/launch/torchrun.sh --config conf/stage2.yaml \
#       --config conf/trainer/fsdp.yaml --config experiments/stage2_whisper_vicuna.yaml
#
# (and NODE_RANK=1 on the second node). torchrun starts one process per GPU; Lightning reads the
# ranks it sets (TorchElasticEnvironment), so the trainer only needs the same node and GPU counts.
# data.batch_size is per GPU: the global batch is batch_size x GPUS_PER_NODE x NNODES.
# tests/stages/test_multinode.py runs this layout on one machine: 2 nodes x 1 process on loopback.
set -euo pipefail
: "${NNODES:?set NNODES}" "${NODE_RANK:?set NODE_RANK}" "${MASTER_ADDR:?set MASTER_ADDR}"
MASTER_PORT="${MASTER_PORT:-29500}"
GPUS_PER_NODE="${GPUS_PER_NODE:-$(nvidia-smi -L | wc -l)}"
exec python -m torch.distributed.run \
  --nnodes "$NNODES" --node_rank "$NODE_RANK" --nproc_per_node "$GPUS_PER_NODE" \
  --master_addr "$MASTER_ADDR" --master_port "$MASTER_PORT" \
  -m slit_lightning.cli.main fit "$@" \
  --trainer.num_nodes "$NNODES" --trainer.devices "$GPUS_PER_NODE"
