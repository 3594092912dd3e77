#!/usr/bin/env bash
# Issue 15's GPU figures in ONE device call of at most 7 minutes (TOTAL seconds, default 420), JSON + logs into $OUT:
#   OUT=/tmp/gpu bash scripts/gpu_bench_all.sh [llama2c_model.py]
# 1. bench_train's table (110M first, then 15M instruct padded and packed, 15M pretrain; per row the seconds the
#    first step spent compiling and the recompiles, TORCH_LOGS=recompiles) with every ratio against llama2.c's
#    own model.py timed in the same run (copy it to llama2c_model.py at the repository root and carry it);
# 2. python train.py experiment=instruct_scratch for 150 steps, end to end (data preparation, training, validation,
#    export, adherence evaluation on the GPU), offline: a synthetic TinyStories-format corpus and a Llama-2-style
#    tokenizer (a BPE trained on that corpus, filled up with unused pieces to Llama 2's 32000, so the head has the
#    shape of the real run's; ids 0/1/2 = unk/bos/eos as Llama 2's);
# 3. that run's tokens/s against bench_train's Lightning figure for the same rows (15M instruct, packed);
# 4. issue 15's targets, each MET / MISSED / NOT MEASURED with its value, computed from the JSON written above.
# The GPU machine needs hydra-core, omegaconf and antlr4-python3-runtime for train.py: carry them as wheels
# (docs/BENCHMARKS.md, GPU section). SMOKE=1 runs every step at CPU-sized shapes: a rehearsal without a GPU.
# The GPU checks of earlier issues stay available, one device call each:
#   ONLY="loss generate sync tests"   ONLY="train_eager lora qlora"   ONLY="fsdp"
#   ONLY="eval" (issue 23: LlamalitLM vs HFLM under bf16; carry lm-eval and its dependencies as wheels too)
set -uo pipefail
OUT=${OUT:-gpu_results}
L2C=${1:-}
mkdir -p "$OUT"
RUNS=${RUNS:-/tmp/llamalit_bench_train}  # instruct shards (~60 MB), corpus and runs: kept out of $OUT
export PYTHONPATH="src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1 HYDRA_FULL_ERROR=1 WANDB_MODE=disabled
ONLY=${ONLY:-train instruct compare targets}
SMOKE=${SMOKE:-0}
TOTAL=${TOTAL:-420}  # the whole script's budget: no step runs past it
start=$SECONDS
run() {  # name, seconds, command...: a failing or slow step never stops the others
  local name=$1 limit=$2; shift 2
  [[ " $ONLY " == *" $name "* ]] || return 0
  local left=$((TOTAL - (SECONDS - start)))
  (( limit > left )) && limit=$left
  (( limit < 5 )) && { echo "== $name: NOT RUN (the ${TOTAL}s budget is spent)"; return 0; }
  echo "== $name (limit ${limit}s, at $((SECONDS - start))s)"
  timeout "$limit" "$@" 2>&1 | tee "$OUT/$name.log" | grep -v -i warn | grep -v "Recompiling function" | tail -25
}
compiles() {  # per bench_train row: the compile seconds it printed and the recompiles logged inside it
  awk '/^== row /{row=substr($0, 8); rows[++n]=row; rec[row]=0}
       /Recompiling function/{if (row != "") rec[row]++}
       /^== compile seconds /{sub(/^== compile seconds /, ""); split($0, a, ": "); secs[a[1]]=a[2]}
       END{for (i = 1; i <= n; i++) printf "compile %-28s %s; recompiles %d\n", rows[i] ":", \
           (rows[i] in secs ? secs[rows[i]] : "not finished"), rec[rows[i]]}' "$1"
}
if [[ "$SMOKE" == 1 ]]; then  # CPU-sized: the same steps and checks, tiny batches, no GPU
  DEVICE=cpu; BENCH=(--configs 15m_pretrain,15m_instruct --batch 2 --accum 1 --steps 3 --warmup 1)
  TRAIN=(trainer.accelerator=cpu trainer.max_steps=4 trainer.log_every_n_steps=1 data.batch_size=2
         trainer.accumulate_grad_batches=1
         trainer.limit_val_batches=2 evaluation.adherence_n=4 evaluation.max_new_tokens=16); SHARDS=2; STORIES=400
  LIMIT_BENCH=600; LIMIT_TRAIN=600
else
  # 110M first: with ~7 graphs compiled from a cold cache it would otherwise be the row a time limit cuts
  DEVICE=cuda; BENCH=(--configs 110m,15m_instruct,15m_pretrain --steps 12 --warmup 4)
  TRAIN=(trainer.max_steps=150 trainer.limit_val_batches=20); SHARDS=9; STORIES=12000
  LIMIT_BENCH=230; LIMIT_TRAIN=150
  nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv > "$OUT/gpu.txt"
fi
python -c "import torch, lightning; print(torch.__version__, lightning.__version__)" >> "$OUT/gpu.txt"

# 1. the table; the JSON is rewritten after every row, so a time limit keeps the rows measured
TORCH_LOGS=recompiles run train "$LIMIT_BENCH" python scripts/bench_train.py --device "$DEVICE" "${BENCH[@]}" \
    --repeats 1 ${L2C:+--llama2c-model "$L2C"} --run-dir "$RUNS" --json "$OUT/bench_train.json"
[[ -f "$OUT/train.log" && " $ONLY " == *" train "* ]] && compiles "$OUT/train.log" | tee "$OUT/compiles.log"

# 2. offline data for instruct_scratch: the corpus and a 32000-piece tokenizer
make_data() {
python - "$RUNS/instruct_scratch_data" "$SHARDS" "$STORIES" <<'EOF'
import sys
from pathlib import Path

from sentencepiece import sentencepiece_model_pb2 as pb

from llamalit.data.synthetic import make_corpus
from llamalit.data.text_formats import read_records, shorten_prompt
from llamalit.data.tokenizer import train_tokenizer

out, shards, stories, vocab = Path(sys.argv[1]), int(sys.argv[2]), int(sys.argv[3]), 32000
files = make_corpus(out / "corpus", shards, stories, seed=0)
texts = [f"{shorten_prompt(r['instruction']['prompt:'])}\n{r['story']}" for r in read_records(files[1])]
model = pb.ModelProto()
model.ParseFromString(train_tokenizer(texts, 4096, out / "bpe.model", hard_vocab_limit=False).read_bytes())
learned = len(model.pieces)
for i in range(vocab - learned):  # never produced by encoding: they only give the head Llama 2's width
    piece = model.pieces.add()
    piece.piece, piece.score, piece.type = f"<unused{i}>", 0.0, pb.ModelProto.SentencePiece.UNUSED
(out / "llama2_style.model").write_bytes(model.SerializeToString())
print(f"corpus {shards} x {stories} stories in {out / 'corpus'}; tokenizer {out / 'llama2_style.model'}: "
      f"{learned} learned pieces + {vocab - learned} unused = {vocab}")
EOF
}
if [[ " $ONLY " == *" instruct "* ]]; then
  make_data 2>&1 | tee "$OUT/instruct_data.log"
  D="$RUNS/instruct_scratch_data"
  rm -rf "$RUNS/instruct_scratch_run"
  # data.packing=true: the layout of bench_train's packed row (auto already packs on CUDA; the CPU rehearsal too)
  run instruct "$LIMIT_TRAIN" python train.py experiment=instruct_scratch "data.source=$D/corpus" \
      "data.tokenizer=$D/llama2_style.model" data.tokenizer_sha256=null data.sha256=null data.packing=true \
      "data.dir=$D/shards" logger=csv export_dir=null "paths.cache_dir=$RUNS/cache" \
      "hydra.run.dir=$RUNS/instruct_scratch_run" "${TRAIN[@]}"
  cp "$RUNS/instruct_scratch_run/summary.json" "$OUT/instruct_scratch_summary.json" 2>/dev/null
fi

# 3. the run's tokens/s against bench_train's Lightning figure for the same rows
if [[ " $ONLY " == *" compare "* ]]; then
python - "$OUT/bench_train.json" "$RUNS/instruct_scratch_run" <<'EOF' 2>&1 | tee "$OUT/compare.log"
import csv
import json
import statistics
import sys
from pathlib import Path

bench, run = Path(sys.argv[1]), Path(sys.argv[2])
if not bench.is_file() or not (run / "summary.json").is_file():
    sys.exit(f"compare: missing {bench if not bench.is_file() else run / 'summary.json'} (an earlier step failed)")
row = next((r for r in json.loads(bench.read_text())["rows"]
            if r["config"].startswith("15M instruct") and r["layout"] == "packed"), None)
if row is None:
    sys.exit("compare: bench_train measured no 15M instruct packed row")
summary = json.loads((run / "summary.json").read_text())
# the summary's figure spans the whole run, compilation and the first steps included; the logger's windows
# (perf/tokens_per_s every 10 steps) of the second half are the steady state bench_train times
rates = [float(r["perf/tokens_per_s"]) for r in csv.DictReader(open(run / "csv" / "metrics.csv"))
         if r.get("perf/tokens_per_s")]
steady = statistics.median(rates[len(rates) // 2:]) if rates else None
bench_rate = row["lightning_tokens_per_s"]
print(f"bench_train Lightning, {row['config']} packed: {bench_rate:,.0f} tokens/s")
print(f"instruct_scratch summary tokens_per_s (whole run): {summary['tokens_per_s']:,.0f} "
      f"({summary['tokens_per_s'] / bench_rate:.2f}x), {summary['step']} steps in {summary['seconds']} s")
adherence = summary.get("adherence") or {}
print(f"end-of-run adherence evaluation: {adherence.get('seconds')} s for {adherence.get('n_stories')} stories")
if steady is None:
    sys.exit("compare: the run logged no perf/tokens_per_s (fewer than 10 steps?)")
ok = abs(steady / bench_rate - 1) <= 0.10
print(f"instruct_scratch steady tokens/s (median of the second half's windows): {steady:,.0f} "
      f"({steady / bench_rate:.2f}x): {'within' if ok else 'NOT within'} 10% of bench_train's")
EOF
fi

# 4. the targets, from bench_train.json and the run's summary (never typed in here)
if [[ " $ONLY " == *" targets "* ]]; then
python - "$OUT/bench_train.json" "$OUT/instruct_scratch_summary.json" <<'EOF' 2>&1 | tee "$OUT/targets.log"
import json
import sys
from pathlib import Path

bench, summary = Path(sys.argv[1]), Path(sys.argv[2])
rows = json.loads(bench.read_text())["rows"] if bench.is_file() else []
run = json.loads(summary.read_text()) if summary.is_file() else {}


def row(prefix, layout):
    return next((r for r in rows if r["config"].startswith(prefix) and r["layout"] == layout), None)


def check(name, value, ok, shown):
    verdict = "NOT MEASURED" if value is None else "MET" if ok(value) else "MISSED"
    print(f"{verdict:12} {name}: {shown(value) if value is not None else 'no figure (see the logs above)'}")


print("issue 15's targets (Lightning path; ratios against llama2.c's model.py timed in the same run):")
r = row("15M pretrain", "dense")
check("15M pretrain >= 1.3x llama2.c tokens/s", r and r["ratio_vs_llama2c_same_run"], lambda v: v >= 1.3,
      lambda v: f"{v:.2f}x ({r['lightning_tokens_per_s']:,.0f} vs {r['llama2c_same_run_tokens_per_s']:,.0f})")
r = row("110M ", "dense")
check("110M >= 1.3x llama2.c tokens/s", r and r["ratio_vs_llama2c_same_run"], lambda v: v >= 1.3,
      lambda v: f"{v:.2f}x ({r['lightning_tokens_per_s']:,.0f} vs {r['llama2c_same_run_tokens_per_s']:,.0f})")
check("110M MFU >= 60%", r and r["mfu"], lambda v: v >= 0.60, lambda v: f"{100 * v:.1f}%")
r = row("15M instruct", "packed")
check("15M instruct, packed, useful tokens/s >= 2x llama2.c's (padded rows)",
      r and r.get("useful_ratio_vs_llama2c_same_run"), lambda v: v >= 2.0,
      lambda v: f"{v:.2f}x ({r['useful_tokens_per_s']:,.0f} vs {r['llama2c_same_run_useful_tokens_per_s']:,.0f})")
worst = max(rows, key=lambda x: x["lightning_overhead_pct"], default=None)
check("Lightning within 3% of the plain loop (every row)", worst and worst["lightning_overhead_pct"],
      lambda v: v <= 3.0, lambda v: f"worst {v:+.1f}% ({worst['config']} {worst['layout']}); "
      + ", ".join(f"{x['config']} {x['layout']} {x['lightning_overhead_pct']:+.1f}%" for x in rows))
ev = (run.get("adherence") or {}).get("seconds")
share = ev / run["seconds"] if ev is not None and run.get("seconds") else None
check("end-of-run evaluation <= 10% of the run", share, lambda v: v <= 0.10,
      lambda v: f"{100 * v:.1f}% ({ev:.1f} s of {run['seconds']} s, {run.get('step')} steps)")
print("steps timed (the plain loop runs the module's):",
      {f"{x['config']} {x['layout']}": x.get("plain_step") for x in rows})
EOF
fi
echo "== total $((SECONDS - start))s"

# ---- the other GPU checks (issues 3, 6, 8, 9), by ONLY ----
run train_eager 140 python scripts/bench_train.py --device cuda --compile off --configs 15m_pretrain,110m \
    --steps 15 --warmup 5 --repeats 1 --layouts padded --run-dir "$RUNS" --json "$OUT/bench_train_eager.json"
run loss 100 python scripts/bench_loss.py --device cuda --iters 20 --warmup 3 --rounds 2 --json "$OUT/bench_loss.json"
run generate 150 python scripts/bench_generate.py --devices cuda --shapes stories15m,stories110m --repeats 3 \
    --json "$OUT/bench_generate_cuda.json"
run lora 150 python scripts/bench_lora.py --preset stories110m --device cuda --batch 16 --seq 350 --steps 20 \
    --warmup 5 --json "$OUT/bench_lora.json"
run qlora 240 python scripts/bench_qlora.py --json "$OUT/bench_qlora.json"
EVAL_DEVICE=$([[ "$SMOKE" == 1 ]] && echo cpu || echo cuda)
run eval 200 python scripts/bench_eval.py --device "$EVAL_DEVICE" --shape stories15m --docs 64 \
    --tasks b_mc,b_mcw,b_ppl,b_gen --repeat 3 --json "$OUT/bench_eval.json"
run sync 150 bash -c "python scripts/check_sync.py && python scripts/check_sync.py --packed --compile && \
    python scripts/check_sync.py --lightning --packed --compile"
# -m "": the gpu-marked tests (flex training, the CUDA-graph decode) and the slow ones too
run tests 150 python -m pytest -q -x -m "" tests/model/test_losses.py tests/model/test_packing_model.py tests/inference/test_generate.py \
    tests/training/test_one_graph.py
# Lightning's FSDP refuses the CPU, so its first real run is here (one GPU): the demo fully sharded, exported whole
# from the gathered state dict.
if [[ " $ONLY " == *" fsdp "* ]]; then
  run fsdp 240 python train.py experiment=demo trainer=fsdp trainer.devices=1 \
      trainer.max_steps=20 trainer.val_check_interval=20 trainer.limit_val_batches=2 logger=csv \
      paths.cache_dir="$OUT/cache" hydra.run.dir="$OUT/fsdp_run" evaluation.adherence_n=4
  python -c "from llamalit.checkpoints import load_checkpoint; m = load_checkpoint('$OUT/fsdp_run'); print('fsdp export loads:', m.num_params(), 'params')" 2>&1 | tee -a "$OUT/fsdp.log"
fi
