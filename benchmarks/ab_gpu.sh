#!/usr/bin/env bash
# A/B timing of two pagellm trees on one GPU, interleaved in one machine session (A, B, A, B, ...), so
# that the drift between two runs of the same workload (~10% between machines, a few % on one) hits both:
#   bench prefill   8 x 2048 tokens, one step;
#   bench latency   batch 1, 128 -> 128 tokens;
#   bench throughput 256 requests, input 32-512, output 256, --ignore-eos;
# random Llama-3-8B-shape weights, bf16, the same flags as benchmarks/run_gpu.sh but without HF baselines.
# Usage: A=.baseline B=. OUT=/tmp/out [ROUNDS=2] [PARTS="prefill latency throughput"] bash benchmarks/ab_gpu.sh
# A and B are folders holding a `pagellm` package (e.g. an older commit unpacked by `git archive`).
# Writes $OUT/{A,B}-PART-ROUND.json and $OUT/ab.json (B/A ratios of each part's headline figures, and every run).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 TOKENIZERS_PARALLELISM=false
OUT=${OUT:-benchmarks/results/ab}
PY=${PYTHON:-python3}
MODEL=${MODEL:-llama-3-8b}
ROUNDS=${ROUNDS:-2}
PARTS=${PARTS:-prefill latency throughput}
BUDGET=${BUDGET:-560}
mkdir -p "$OUT"
OUT=$(realpath "$OUT")

declare -A ARGS=(
  [prefill]="prefill --batch-size 8 --input-len 2048 --num-iters 5 --kv-cache-memory 16GiB"
  [latency]="latency --batch-size 1 --input-len 128 --output-len 128 --num-iters 3"
  [throughput]="throughput --num-prompts 256 --input-len 32-512 --output-len 256 --ignore-eos --kv-cache-memory 40GiB"
)
for round in $(seq "$ROUNDS"); do
  for part in $PARTS; do
    for side in A B; do
      left=$(( BUDGET - SECONDS ))
      if (( left < 60 )); then echo "=== $side $part $round: skipped (budget spent)"; continue; fi
      echo "=== $side $part round $round (t=${SECONDS}s)"
      # run inside the tree: `python -m` puts the working directory first on sys.path
      (cd "${!side}" && PYTHONPATH=. timeout --signal=INT "$left" $PY -m pagellm.cli bench ${ARGS[$part]} \
        --random-model "$MODEL" --dtype bfloat16 --json "$OUT/$side-$part-$round.json") > "$OUT/$side-$part-$round.log" 2>&1 \
        || { echo "failed:"; tail -5 "$OUT/$side-$part-$round.log"; }
    done
  done
done

$PY - "$OUT" <<'EOF'
import glob, json, os, statistics, sys

out = sys.argv[1]
HEADLINES = {"prefill": ("achieved_flops", "TFLOP/s", 1e-12), "latency": ("decode_tokens_per_s_per_seq", "tok/s", 1),
             "throughput": ("output_tokens_per_s", "output tok/s", 1)}
rows, device = [], None
for part, (key, unit, scale) in HEADLINES.items():
    runs = {side: [json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, f"{side}-{part}-*.json")))]
            for side in "AB"}
    if not runs["A"] or not runs["B"]:
        continue
    device = device or runs["A"][0]["device"]
    a = [r["results"][key] * scale for r in runs["A"]]
    b = [r["results"][key] * scale for r in runs["B"]]
    rows.append({"part": part, "metric": key, "unit": unit, "A": a, "B": b,
                 "ratio_of_medians": statistics.median(b) / statistics.median(a)})
for r in rows:
    print(f"{r['part']:<11} {r['unit']:<13} A {' '.join(f'{x:9.1f}' for x in r['A'])}   "
          f"B {' '.join(f'{x:9.1f}' for x in r['B'])}   B/A {r['ratio_of_medians']:.3f}")
runs = {os.path.basename(f)[:-5]: json.load(open(f)) for f in sorted(glob.glob(os.path.join(out, "[AB]-*.json")))}
json.dump({"device": device, "rows": rows, "runs": runs}, open(os.path.join(out, "ab.json"), "w"), indent=2)
EOF
