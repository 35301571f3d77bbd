#!/usr/bin/env bash
# The one device check of the fast sampling path (issue 5), for a lent H100 or H200.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; about 6-8 minutes
#
# Needs python3 with CUDA PyTorch (the package need not be installed: src/ goes on PYTHONPATH).
# Three runs of benchmarks/throughput.py on SiT-XL/2 with random weights, each time-boxed so the
# whole script ends within $BUDGET seconds (compilation included):
#   1. the table: official-equivalent, fast eager, fast compiled at batch 64 and 256; errors
#      against float32 (one forward, 20 SDE steps with shared noise) at batch 64; a real
#      250-step SDE run of the compiled path at batch 64;
#   2. candidate speed-ups at batch 64: cuDNN attention, cuBLASLt bias+GELU epilogue, both,
#      and both compiled (with the float32 maths check of each);
#   3. if time is left: torch.compile's max-autotune at batch 64.
# Writes $OUT/nvidia-smi.txt and, per run, NAME.json (every figure, saved as measured) and
# NAME.log (progress and the markdown table): 7 files. BENCH_ARGS adds arguments to every run
# (a CPU dry run: BENCH_ARGS="--tiny --device cpu").
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
BUDGET="${BUDGET:-470}"
PY="${PYTHON:-python3}"
read -r -a EXTRA <<<"${BENCH_ARGS:-}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

left() { echo $((BUDGET - SECONDS)); }

bench() { # bench NAME SECONDS ARGS...: one time-boxed run, its log also on the console
	local name=$1 limit=$2
	shift 2
	echo "=== $name (limit ${limit} s, $(left) s left) ==="
	timeout --kill-after=10 "$limit" "$PY" benchmarks/throughput.py "$@" "${EXTRA[@]}" \
		--json "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
	local rc=${PIPESTATUS[0]}
	[ "$rc" = 124 ] && echo "=== $name stopped at its ${limit} s limit; $OUT/$name.json keeps what it measured ==="
	return "$rc"
}

(nvidia-smi || echo "nvidia-smi not available") 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" |
	tee -a "$OUT/nvidia-smi.txt"

bench throughput 360 --batches 64 256 --sample-batches 64
status=$?

limit=$(($(left) - 15))
if [ "$limit" -ge 60 ]; then
	[ "$limit" -gt 150 ] && limit=150
	bench variants "$limit" --batches 64 --error-steps 0 \
		--paths official fast fast+cudnn fast+gelu fast+cudnn+gelu fast+compile+cudnn+gelu
fi

limit=$(($(left) - 10))
if [ "$limit" -ge 90 ]; then
	bench autotune "$limit" --batches 64 --error-steps 0 --paths official fast+autotune
else
	echo "=== autotune skipped: $(left) s left ==="
fi

echo "=== summary ($SECONDS s) ==="
for name in throughput variants autotune; do
	[ -f "$OUT/$name.log" ] && sed -n '/^## Throughput/,$p' "$OUT/$name.log"
done
exit "$status"
