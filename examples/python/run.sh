#!/usr/bin/env bash
# Compiles all-MiniLM-L6-v2 into libminilm.so with kiln (as examples/c/run.sh does) and embeds the
# fixture's sentences from Python through ctypes and numpy. Run after `bash scripts/fetch-models.sh`,
# which also makes the venv with numpy (models/.venv) this script uses unless PYTHON is set.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${OUT:-$root/target/examples/minilm-python}"
kiln="${KILN:-$root/target/release/kiln}"
python="${PYTHON:-$root/models/.venv/bin/python}"
if [ ! -x "$kiln" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
mkdir -p "$(dirname "$out")"
"$kiln" compile "$root/models/minilm-l6" --shape input_ids=1xseq:128 --name minilm -o "$out" > "$out.log" \
  || { cat "$out.log"; exit 1; }
"$python" "$root/examples/python/embed.py" "$out" "$root/../shared/fixtures/minilm-l6/reference.safetensors"
