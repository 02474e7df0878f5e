#!/usr/bin/env bash
# The one-command GPU suite (`make gpu-check`): kernel tests on CUDA (bf16 included), the kernel
# benchmarks against SDPA and cuDNN, GPT-2 small decode through `genie serve --device cuda:0` (and per
# compile tier: generated code, Inductor), and the overlap bench. Every figure lands under
# bench/results/gpu/ as JSON. Budget: under 13 minutes.
set -uo pipefail
cd "$(dirname "$0")/../.."
PY=${PY:-.venv/bin/python}
OUT=bench/results/gpu
mkdir -p "$OUT"
export OMP_NUM_THREADS=1
"$PY" -c "import sys, torch; sys.exit(0 if torch.cuda.is_available() else 'gpu-check: torch sees no CUDA device')" || exit 2
status=0
step() {  # step NAME SECONDS CMD...: run with a time limit, record rc and seconds in JSON
  local name=$1 limit=$2; shift 2
  local t0=$SECONDS
  timeout "$limit" "$@"; local rc=$?
  echo "{\"step\": \"$name\", \"rc\": $rc, \"seconds\": $((SECONDS - t0))}" > "$OUT/step_$name.json"
  [ $rc -eq 0 ] || status=1
}
step kernel_tests 210 "$PY" -m pytest -q -p no:cacheprovider --junitxml="$OUT/kernel_tests.xml" \
  tests/test_kernels_attention.py tests/test_kernels_conv.py tests/test_kernels_dispatch.py tests/test_kernels_compile.py
"$PY" - "$OUT/kernel_tests.xml" <<'PYEOF' > "$OUT/kernel_tests.json"
import json, sys, xml.etree.ElementTree as ET
s = ET.parse(sys.argv[1]).getroot().find("testsuite") or ET.parse(sys.argv[1]).getroot()
print(json.dumps({k: s.get(k) for k in ("tests", "failures", "errors", "skipped", "time")}))
PYEOF
step attention 90 "$PY" bench/attention.py --quick --out "$OUT/attention.json"
step conv 90 "$PY" bench/conv.py --quick --out "$OUT/conv.json"
step decode_gpt2 60 "$PY" bench/gpu/decode_gpt2.py --out "$OUT/decode_gpt2.json"
step decode_tiers 300 "$PY" bench/decode.py --models gpt2-small --tiers codegen,inductor --steps 16 --round-trips 50
cp -f bench/results/decode.json "$OUT/decode_tiers.json" 2>/dev/null || true
step overlap 30 "$PY" bench/overlap.py
cp -f bench/results/overlap.json "$OUT/overlap.json" 2>/dev/null || true
cat "$OUT"/step_*.json
exit $status
