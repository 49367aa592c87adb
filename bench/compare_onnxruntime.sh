#!/usr/bin/env bash
# ONNX Runtime against kiln on paraphrase-MiniLM-L3-v2 at batch 1, seq 16/128/512, one thread,
# the two engines interleaved round by round on the same machine; prints the median latencies and
# the kiln/ORT ratio. ONNX Runtime comes from PyPI into a local venv (models/.bench-venv).
# kiln runs through `kiln bench --backend jit` (the AOT executable does not exist yet).
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh > /dev/null
if [ ! -x models/.bench-venv/bin/python ]; then
  python3 -m venv models/.bench-venv
  models/.bench-venv/bin/pip install --quiet onnxruntime numpy
fi
cargo build --release --quiet
model=models/minilm-l3-onnx/paraphrase-MiniLM-L3-v2.onnx
rounds=${ROUNDS:-3}
iters=${ITERS:-10}
printf '%-6s %-8s %12s %12s %10s\n' seq threads "ORT ms" "kiln ms" "kiln/ORT"
for seq in 16 128 512; do
  ort_times=(); kiln_times=()
  for _ in $(seq "$rounds"); do
    ort_line=$(models/.bench-venv/bin/python bench/ort_latency.py "$model" "$seq" 1 "$iters")
    ort_times+=("${ort_line##* }")
    kiln_line=$(./target/release/kiln bench "$model" --shape input_ids=1xseq:512 --dim "seq=$seq" --iters "$iters" --warmup 2 | grep '^run:')
    kiln_times+=("$(echo "$kiln_line" | sed -E 's/^run: median ([0-9.]+) ms.*/\1/')")
  done
  ort=$(printf '%s\n' "${ort_times[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  kiln=$(printf '%s\n' "${kiln_times[@]}" | sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}')
  printf '%-6s %-8s %12.3f %12.3f %10.1f\n' "$seq" 1 "$ort" "$kiln" "$(awk -v k="$kiln" -v o="$ort" 'BEGIN {print k / o}')"
done
echo "($(models/.bench-venv/bin/python -c 'import onnxruntime; print("onnxruntime", onnxruntime.__version__)'), median of $rounds rounds of $iters runs each)"
