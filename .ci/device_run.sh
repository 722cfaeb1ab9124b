#!/usr/bin/env bash
# One batched run on a lent GPU machine (packages preinstalled): build for sm_90, run each test
# file in its own process (a kernel fault poisons only that file's CUDA context), then the
# benchmarks named in $BENCH. Logs go to /tmp/logs, packed into $OUT/logs.tgz at the end (the
# device tool returns at most 8 files).
set -u
export TEXTGPT2_CUDA_ARCH=${TEXTGPT2_CUDA_ARCH:-90}
OUT=${OUT:-/tmp/out}; L=/tmp/logs; mkdir -p "$OUT" "$L"
trap 'tar czf "$OUT/logs.tgz" -C "$L" .' EXIT
{ nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
  python3 -c "import cupy, torch; print('cupy', cupy.__version__, 'torch', torch.__version__)"; } > "$L/env.txt" 2>&1
t0=$(date +%s)
python3 -c "import pybind11" 2>/dev/null || export PYTHONPATH=$PWD/.carry${PYTHONPATH:+:$PYTHONPATH}
python3 -m pip install -q --no-build-isolation --no-deps -e . > "$L/build.txt" 2>&1 || { echo BUILD FAILED; tail -40 "$L/build.txt"; exit 1; }
echo "build: $(( $(date +%s) - t0 )) s"
for f in ${TESTS:-tests/test_*.py}; do
  timeout ${FILE_TIMEOUT:-240} python3 -m pytest -q -p no:cacheprovider --tb=short ${PYTEST_ARGS:-} "$f" > "$L/$(basename $f .py).log" 2>&1
  echo "$(basename $f): rc=$? $(tail -1 "$L/$(basename $f .py).log")"
done
for tool in ${SANITIZE:-}; do  # compute-sanitizer over the small GPU op tests, file by file
  for f in ${SAN_TESTS:-}; do
    log="$L/san_${tool}_$(basename $f .py).log"
    timeout ${SAN_TIMEOUT:-120} compute-sanitizer --tool $tool --error-exitcode 99 --print-limit 20 \
      python3 -m pytest -q -p no:cacheprovider -x -m "gpu and not big" "$f" > "$log" 2>&1
    echo "sanitizer $tool $(basename $f): rc=$? $(grep -E 'ERROR SUMMARY|passed|failed' "$log" | tail -2 | tr '\n' ' ')"
  done
done
for spec in ${BENCH:-}; do   # name or name:--flag,--flag
  b=${spec%%:*}; args=""; [ "$spec" != "$b" ] && args=$(echo "${spec#*:}" | tr ',' ' ')
  timeout ${BENCH_TIMEOUT:-200} python3 benchmarks/$b.py $args --json "$L/$b.json" > "$L/$b.txt" 2>&1
  echo "== $b rc=$?"; cat "$L/$b.txt" | tail -30
done
