#!/usr/bin/env bash
# Every GPU figure the issues ask for, JSON + logs into $OUT (each step's limit below is its worst case).
#   OUT=/tmp/gpu bash scripts/gpu_bench_all.sh [path/to/llama2.c/model.py]
# The device tool allows 10 minutes a call and 30 a session: run the steps with ONLY, most important first
# (issue 8's training table, then the rest); each group's limits add up to under 10 minutes:
#   ONLY="train15 sync tests"   ONLY="train110 loss train_eager"   ONLY="generate lora qlora"   ONLY="fsdp"
# Needs torch (CUDA), lightning, torchmetrics, sentencepiece, safetensors, numpy, transformers; optional
# bitsandbytes (QLoRA rows) and liger-kernel (liger loss rows). Runs from the repository root.
set -uo pipefail
OUT=${OUT:-gpu_results}
L2C=${1:-}
mkdir -p "$OUT"
RUNS=${RUNS:-/tmp/llamalit_bench_train}  # instruct shards (~60 MB) and CSV logs: kept out of $OUT
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1  # full tracebacks in the logs
ONLY=${ONLY:-train15 sync tests train110 loss train_eager generate lora qlora fsdp}
run() {  # name, seconds, command...: a failing or slow step never stops the others
  local name=$1 limit=$2; shift 2
  [[ " $ONLY " == *" $name "* ]] || return 0
  echo "== $name"; timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -i warn | tail -25
}
nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
python -c "import torch, lightning; print(torch.__version__, lightning.__version__)" >> "$OUT/gpu.txt"
# issue 8's table, split so that a time limit costs one half, and JSON is rewritten after every row
run train15 300 python scripts/bench_train.py --device cuda --configs 15m_pretrain,15m_instruct \
    --steps 25 --warmup 8 --repeats 1 ${L2C:+--llama2c-model "$L2C"} --profile --run-dir "$RUNS" \
    --json "$OUT/bench_train_15m.json"
run train110 330 python scripts/bench_train.py --device cuda --configs 110m,110m_lora \
    --steps 20 --warmup 6 --repeats 1 ${L2C:+--llama2c-model "$L2C"} --profile --run-dir "$RUNS" \
    --json "$OUT/bench_train_110m.json"
cp "$RUNS"/profile_*.txt "$OUT/" 2>/dev/null  # the top-operator tables; the shards and logs stay behind
run train_eager 140 python scripts/bench_train.py --device cuda --compile off --configs 15m_pretrain,110m \
    --steps 15 --warmup 5 --repeats 1 --layouts padded --run-dir "$RUNS" \
    --json "$OUT/bench_train_eager.json"
run loss 100 python scripts/bench_loss.py --device cuda --iters 20 --warmup 3 --rounds 2 --json "$OUT/bench_loss.json"
run generate 150 python scripts/bench_generate.py --devices cuda --shapes stories15m,stories110m --repeats 3 \
    --json "$OUT/bench_generate_cuda.json"
run lora 150 python scripts/bench_lora.py --preset stories110m --device cuda --batch 16 --seq 350 --steps 20 \
    --warmup 5 --json "$OUT/bench_lora.json"
run qlora 240 python scripts/bench_qlora.py --json "$OUT/bench_qlora.json"
run sync 150 bash -c "python scripts/check_sync.py && python scripts/check_sync.py --packed --compile && \
    python scripts/check_sync.py --lightning --packed --compile"
run tests 90 python -m pytest -q -x tests/test_losses.py tests/test_packing_model.py
# Lightning's FSDP refuses the CPU, so its first real run is here (one GPU; needs hydra-core, omegaconf and
# wandb, carried as wheels): the demo fully sharded, exported whole from the gathered state dict.
if [[ " $ONLY " == *" fsdp "* ]] && python -c "import hydra, omegaconf" 2>/dev/null; then
  run fsdp 240 env WANDB_MODE=disabled python train.py experiment=demo trainer=fsdp trainer.devices=1 \
      trainer.max_steps=20 trainer.val_check_interval=20 trainer.limit_val_batches=2 logger=csv \
      paths.cache_dir="$OUT/cache" hydra.run.dir="$OUT/fsdp_run" evaluation.adherence_n=4
  python -c "from llamalit.checkpoints import load_checkpoint; m = load_checkpoint('$OUT/fsdp_run'); print('fsdp export loads:', m.num_params(), 'params')" 2>&1 | tee -a "$OUT/fsdp.log"
fi
