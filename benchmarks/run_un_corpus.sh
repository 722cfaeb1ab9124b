#!/usr/bin/env bash
# The issue-4 real run: the default byte-level model on the UN General Debate corpus
# (../shared/data/ungdc_1946-2024.txt.xz, 190 MiB) for about $MINUTES minutes on one GPU.
# A short timing run sizes --steps so the whole cosine schedule fits the time, then the real
# run trains, logs (JSON lines), saves a checkpoint and generates a sample.
#   bash benchmarks/run_un_corpus.sh CORPUS OUTDIR [MINUTES]
set -euo pipefail
CORPUS=${1:?corpus path}; OUTDIR=${2:?output dir}; MINUTES=${3:-5}
mkdir -p "$OUTDIR"
python3 -m textgpt2.train --data "$CORPUS" --max-chars 20000000 --allow-small-data --steps 300 \
  --eval-every 0 --generate 0 --save-every 0 --out "$OUTDIR/timing" --log "$OUTDIR/timing.jsonl" \
  --log-every 100 ${EXTRA:-} > "$OUTDIR/timing.txt" 2>&1
STEPS=$(python3 - "$OUTDIR/timing.jsonl" "$MINUTES" <<'PY'
import json, sys
rows = [json.loads(l) for l in open(sys.argv[1])]
last, mid = rows[-1], rows[len(rows) // 2]
per_step = (last["elapsed_s"] - mid["elapsed_s"]) / (last["step"] - mid["step"])
print(int(float(sys.argv[2]) * 60 * 0.9 / per_step))  # 10% left for evaluation
PY
)
echo "timing run: $(tail -1 "$OUTDIR/timing.jsonl")"; echo "steps for $MINUTES min: $STEPS"
python3 -m textgpt2.train --data "$CORPUS" --steps "$STEPS" --eval-every $((STEPS / 10)) \
  --log "$OUTDIR/train.jsonl" --log-every $((STEPS / 20)) --save-every 0 --out "$OUTDIR/ckpt" \
  --prompt "The General Assembly" --generate 400 ${EXTRA:-} 2>&1 | tee "$OUTDIR/train.txt"
