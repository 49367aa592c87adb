#!/usr/bin/env bash
# ONNX Runtime against kiln's AOT executable on paraphrase-MiniLM-L3-v2 at batch 1, seq 16/128/512,
# on 1 and 2 threads, the two engines interleaved round by round on the same machine; prints the
# median latencies and the kiln/ORT ratio. ONNX Runtime comes from PyPI into a local venv
# (models/.bench-venv). kiln compiles the model once (`kiln compile`, maxima seq 512) and times its
# executable's `--bench` mode, which runs the model in-process after warm-up like ort_latency.py.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/fetch-models.sh > /dev/null
if [ ! -x models/.bench-venv/bin/python ]; then
  python3 -m venv models/.bench-venv
  models/.bench-venv/bin/pip install --quiet onnxruntime numpy
fi
cargo build --release --quiet
model=models/minilm-l3-onnx/paraphrase-MiniLM-L3-v2.onnx
out=target/bench/minilm-l3
./target/release/kiln compile "$model" --shape input_ids=1xseq:512 --name minilm_l3 -o "$out" > /dev/null
rounds=${ROUNDS:-3}
iters=${ITERS:-20}
median() { sort -g | awk '{a[NR]=$1} END {print a[int((NR+1)/2)]}'; }
printf '%-6s %-8s %12s %12s %10s\n' seq threads "ORT ms" "kiln ms" "kiln/ORT"
for seq in 16 128 512; do
  python3 bench/token_inputs.py "$out/inputs-$seq.safetensors" "$seq" input_ids attention_mask
  for threads in 1 2; do
    ort_times=(); kiln_times=()
    for _ in $(seq "$rounds"); do
      ort_line=$(models/.bench-venv/bin/python bench/ort_latency.py "$model" "$seq" "$threads" "$iters")
      ort_times+=("${ort_line##* }")
      kiln_line=$("$out/minilm_l3" --inputs "$out/inputs-$seq.safetensors" --bench "$iters" --warmup 3 --threads "$threads" | grep '^run:')
      kiln_times+=("$(echo "$kiln_line" | sed -E 's/^run: median ([0-9.]+) ms.*/\1/')")
    done
    ort=$(printf '%s\n' "${ort_times[@]}" | median)
    kiln=$(printf '%s\n' "${kiln_times[@]}" | median)
    printf '%-6s %-8s %12.3f %12.3f %10.2f\n' "$seq" "$threads" "$ort" "$kiln" "$(awk -v k="$kiln" -v o="$ort" 'BEGIN {print k / o}')"
  done
done
echo "($(models/.bench-venv/bin/python -c 'import onnxruntime; print("onnxruntime", onnxruntime.__version__)'), median of $rounds rounds of $iters runs each; $(grep -m1 'model name' /proc/cpuinfo | cut -d: -f2 | xargs), $(nproc) cores)"
