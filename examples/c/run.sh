#!/usr/bin/env bash
# Compiles all-MiniLM-L6-v2 into libminilm.so + minilm.h with kiln, builds embed.c against them,
# and embeds the fixture's sentences. Run from anywhere, after `bash scripts/fetch-models.sh`.
# OUT (default target/examples/minilm) receives the artifacts.
set -euo pipefail
root="$(cd "$(dirname "$0")/../.." && pwd)"
out="${OUT:-$root/target/examples/minilm}"
kiln="${KILN:-$root/target/release/kiln}"
if [ ! -x "$kiln" ]; then
  cargo build --release --quiet --manifest-path "$root/Cargo.toml"
fi
mkdir -p "$(dirname "$out")"
"$kiln" compile "$root/models/minilm-l6" --shape input_ids=1xseq:128 --name minilm -o "$out" > "$out.log" \
  || { cat "$out.log"; exit 1; }
"${CC:-cc}" -std=c99 -O2 -Wall -Wextra -Werror -I "$out" -o "$out/embed" "$root/examples/c/embed.c" \
  -L "$out" -Wl,-rpath,"$out" -lminilm -lm
"$out/embed" "$root/../shared/fixtures/minilm-l6/reference.safetensors"
