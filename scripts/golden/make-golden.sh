#!/usr/bin/env bash
# Regenerates tests/golden/*.json: HF transformers' logits and greedy tokens for the test kit's
# tiny Gemma 2/3 models (scripts/golden/make_golden.py says what is recorded and how). The Rust
# tests read the committed files and need neither torch nor this script; run it after changing a
# tiny model the files record (the tests name what changed and point here).
#
# Pinned CPU torch and transformers go into a venv of our own, never the system Python (PEP 668):
# $GEMMA_CACHE/golden-venv (default ~/.cache/gemma-cluster). torch comes from the package
# registry, whose Linux build also runs on the CPU (with ~3 GB of CUDA wheels beside it); set
# GOLDEN_TORCH_INDEX to a reachable CPU-only torch index to get the small build instead.
set -euo pipefail
cd "$(dirname "$0")/../.."

TORCH=2.15.0
TRANSFORMERS=5.24.0
SAFETENSORS=0.8.0
NUMPY=2.4.6
venv="${GEMMA_CACHE:-$HOME/.cache/gemma-cluster}/golden-venv"

# Is every pinned version installed? (a CPU index names torch 2.15.0+cpu)
pinned() {
  "$venv/bin/python" - "torch==$TORCH" "transformers==$TRANSFORMERS" \
    "safetensors==$SAFETENSORS" "numpy==$NUMPY" <<'PY' 2>/dev/null
import sys
from importlib.metadata import version
sys.exit(any(version(n).split("+")[0] != v for n, v in (a.split("==") for a in sys.argv[1:])))
PY
}

if ! pinned; then
  echo "make-golden: installing torch $TORCH, transformers $TRANSFORMERS into $venv" >&2
  python3 -m venv "$venv"
  "$venv/bin/pip" install --quiet --disable-pip-version-check \
    ${GOLDEN_TORCH_INDEX:+--index-url "$GOLDEN_TORCH_INDEX"} "torch==$TORCH"
  "$venv/bin/pip" install --quiet --disable-pip-version-check "torch==$TORCH" \
    "transformers==$TRANSFORMERS" "safetensors==$SAFETENSORS" "numpy==$NUMPY"
  pinned || { echo "make-golden: the venv does not hold the pinned versions" >&2; exit 1; }
fi

cargo build --workspace --bins --locked
# The tiny models are written locally; nothing may be fetched from a model hub.
HF_HUB_OFFLINE=1 TRANSFORMERS_VERBOSITY=error "$venv/bin/python" scripts/golden/make_golden.py \
  --tiny-model "${CARGO_TARGET_DIR:-target}/debug/gemma-tiny-model" --out tests/golden
