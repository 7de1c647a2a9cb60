#!/usr/bin/env bash
# Benchmark kc-keras TFLite exports on an Android phone with LiteRT's
# prebuilt benchmark_model tool, then convert its log into bench.json,
# bench.md and bench.png with benchmark.py --parse-benchmark-model.
#
# Usage:
#   mobile_demo/android_benchmark.sh --binary PATH --models RUN/tflite \
#       [--out RUN/bench-android] [--threads "1 2"] [--num-runs 50] \
#       [--warmup-runs 5] [--serial ID] [--python python3] [--keep]
#
# --binary is the benchmark_model executable for the phone's ABI (for
# example android_aarch64_benchmark_model from the LiteRT releases); this
# script does not download it. adb must be on PATH and see the phone.
set -euo pipefail

usage() {
  sed -n '2,13p' "$0" | sed 's/^# \{0,1\}//'
}

die() {
  echo "error: $*" >&2
  exit 2
}

binary=""
models=""
out=""
threads="1 2"
num_runs=50
warmup_runs=5
serial=""
python_bin="${PYTHON:-python3}"
keep=0
remote="/data/local/tmp/kc_bench"

while [[ $# -gt 0 ]]; do
  case "$1" in
    --binary) binary="${2:-}"; shift 2 ;;
    --models) models="${2:-}"; shift 2 ;;
    --out) out="${2:-}"; shift 2 ;;
    --threads) threads="${2:-}"; shift 2 ;;
    --num-runs) num_runs="${2:-}"; shift 2 ;;
    --warmup-runs) warmup_runs="${2:-}"; shift 2 ;;
    --serial) serial="${2:-}"; shift 2 ;;
    --python) python_bin="${2:-}"; shift 2 ;;
    --keep) keep=1; shift ;;
    -h|--help) usage; exit 0 ;;
    *) die "unknown option $1; see --help" ;;
  esac
done

[[ -n "$binary" ]] || die "--binary is required: the path of benchmark_model for the phone's ABI"
[[ -f "$binary" ]] || die "benchmark_model binary not found: $binary"
[[ -n "$models" ]] || die "--models is required, e.g. --models runs/trio-30/tflite"
[[ -d "$models" ]] || die "models folder not found: $models; run kc tflite first"
out="${out:-$(dirname "$models")/bench-android}"
for value in $threads "$num_runs" "$warmup_runs"; do
  [[ "$value" =~ ^[0-9]+$ ]] || die "invalid number $value in --threads, --num-runs or --warmup-runs"
done
command -v adb >/dev/null || die "adb not found on PATH; install Android platform-tools"

adb_cmd=(adb)
[[ -n "$serial" ]] && adb_cmd+=(-s "$serial")
state="$("${adb_cmd[@]}" get-state 2>/dev/null || true)"
[[ "$state" == "device" ]] || die "no Android device ready (adb get-state: ${state:-none}); connect one and enable USB debugging"

shopt -s nullglob
exports=("$models"/student_*.tflite "$models"/generalist_*.tflite "$models"/specialist_*.tflite)
shopt -u nullglob
[[ ${#exports[@]} -gt 0 ]] || die "no student_, generalist_ or specialist_ .tflite files in $models"

script_dir="$(cd "$(dirname "$0")" && pwd)"
mkdir -p "$out"
log="$out/benchmark_model.log"
tmp_log="$(mktemp "$out/.benchmark_model.log.XXXXXX")"
trap 'rm -f "$tmp_log"' EXIT

prop() {
  "${adb_cmd[@]}" shell getprop "$1" | tr -d '\r'
}

echo "pushing benchmark_model and ${#exports[@]} models to $remote" >&2
"${adb_cmd[@]}" shell mkdir -p "$remote" >/dev/null
"${adb_cmd[@]}" push "$binary" "$remote/benchmark_model" >/dev/null
"${adb_cmd[@]}" shell chmod 755 "$remote/benchmark_model"
for file in "${exports[@]}"; do
  "${adb_cmd[@]}" push "$file" "$remote/$(basename "$file")" >/dev/null
done

{
  echo "# kc-keras android_benchmark.sh log"
  echo "# device.model: $(prop ro.product.model)"
  echo "# device.android: $(prop ro.build.version.release)"
  echo "# device.abi: $(prop ro.product.cpu.abi)"
  echo "# device.cores: $("${adb_cmd[@]}" shell nproc | tr -d '\r')"
  echo "# device.benchmark_model: $(basename "$binary")"
} >"$tmp_log"

for file in "${exports[@]}"; do
  name="$(basename "$file")"
  for count in $threads; do
    echo "benchmark_model: $name, $count thread(s)" >&2
    echo "# run: model=$name threads=$count" >>"$tmp_log"
    # benchmark_model logs to stderr; a failed run is kept in the log and
    # skipped by the parser, which needs its final timing line.
    "${adb_cmd[@]}" shell "$remote/benchmark_model" \
      "--graph=$remote/$name" "--num_threads=$count" \
      "--num_runs=$num_runs" "--warmup_runs=$warmup_runs" \
      "--report_peak_memory_footprint=true" 2>&1 | tr -d '\r' >>"$tmp_log" \
      || echo "warning: benchmark_model failed on $name ($count threads)" >&2
  done
done

mv "$tmp_log" "$log"
trap - EXIT
if [[ "$keep" -eq 0 ]]; then
  "${adb_cmd[@]}" shell rm -rf "$remote"
fi
echo "log written to $log" >&2

"$python_bin" "$script_dir/benchmark.py" --parse-benchmark-model "$log" --out "$out"
