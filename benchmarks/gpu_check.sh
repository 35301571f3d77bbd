#!/usr/bin/env bash
# The GPU figures of docs/performance.md (Sampling), measured in one time-boxed run.
#
#   bash benchmarks/gpu_check.sh            # from the repository root; 6 minutes on an H200
#
# Needs python3 with CUDA PyTorch (the package need not be installed: src/ goes on PYTHONPATH;
# the end-to-end run also needs diffusers). Runs, each time-boxed so that the whole script ends
# within $BUDGET seconds (compilation included), in order of importance:
#   1. throughput: the table of benchmarks/throughput.py on SiT-XL/2 with random weights: the
#      official-equivalent path and the default fast path (compiled, cuBLASLt bias+GELU
#      epilogue) at batch 64 and 256; their errors against float32 (one forward, 20 SDE steps
#      with shared noise) at batch 64; a real 250-step SDE run of the fast path at batch 64;
#   2. end_to_end: `python -m selfflow.batch.bench`: the pure sampler rate against
#      `selfflow sample` end to end (decode, checks, shard files) at batch 64, 250 steps;
#   3. variants: what each ingredient buys at batch 64 (eager, GELU epilogue, compile, cuDNN
#      attention), with the float32 maths check of each;
#   4. eval_speed: the evaluator's Inception pass on synthetic images, if time is left.
# Writes $OUT/nvidia-smi.txt and NAME.log per run, NAME.json for the throughput runs: 8 files
# (default $OUT: gpu_check_out/, ignored by git). Without a CUDA device it stops at once, unless
# CPU_DRY_RUN=1: BENCH_ARGS adds arguments to every throughput run (a CPU dry run:
# CPU_DRY_RUN=1 BENCH_ARGS="--tiny --device cpu" E2E_ARGS="--tiny --device cpu --num-steps 4"
# EVAL_ARGS="--device cpu"). No run outlives $BUDGET, and the script ends its runs when it is
# killed (SIGTERM, SIGINT, SIGHUP).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/gpu_check_out}"
BUDGET="${BUDGET:-500}"
PY="${PYTHON:-python3}"
read -r -a EXTRA <<<"${BENCH_ARGS:-}"
read -r -a E2E <<<"${E2E_ARGS:---device cuda}"
read -r -a EVAL <<<"${EVAL_ARGS:-}"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

left() { echo $((BUDGET - SECONDS)); }

CHILD=""
stop() { # on SIGTERM/SIGINT/SIGHUP: end the run in progress (timeout passes the signal on)
	echo "=== stopped by a signal after $SECONDS s ===" >&2
	[ -n "$CHILD" ] && kill -TERM "$CHILD" 2>/dev/null && wait "$CHILD" 2>/dev/null
	exit 143
}
trap stop TERM INT HUP

timed() { # timed NAME SECONDS COMMAND...: one time-boxed run, its log also on the console
	local name=$1 limit=$2
	shift 2
	[ "$limit" -gt "$(left)" ] && limit=$(left) # never past the whole script's budget
	if [ "$limit" -lt 5 ]; then
		echo "=== $name skipped: $(left) s left ==="
		return 124
	fi
	echo "=== $name (limit ${limit} s, $(left) s left) ==="
	# in the background, so that the trap runs at once (bash defers traps until a foreground
	# command ends); the process substitution keeps a copy of the log on the console
	timeout --kill-after=10 "$limit" "$@" > >(tee "$OUT/$name.log") 2>&1 &
	CHILD=$!
	wait "$CHILD"
	local rc=$?
	CHILD=""
	[ "$rc" = 124 ] && echo "=== $name stopped at its ${limit} s limit ==="
	return "$rc"
}

bench() { # bench NAME SECONDS ARGS...: benchmarks/throughput.py, figures also in NAME.json
	local name=$1 limit=$2
	shift 2
	timed "$name" "$limit" "$PY" benchmarks/throughput.py "$@" "${EXTRA[@]}" --json "$OUT/$name.json"
}

if [ "${CPU_DRY_RUN:-0}" != 1 ] &&
	! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)" 2>/dev/null; then
	torch_version=$("$PY" -c "import torch; print(torch.__version__)" 2>&1 | tail -1)
	echo "gpu_check.sh: error: $PY sees no CUDA device (torch: $torch_version); these are" \
		"GPU figures. For a CPU dry run of the script itself, set CPU_DRY_RUN=1." >&2
	exit 2
fi

mkdir -p "$OUT"
(nvidia-smi || echo "nvidia-smi not available") 2>&1 | tee "$OUT/nvidia-smi.txt"
"$PY" -c "import torch; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None)" |
	tee -a "$OUT/nvidia-smi.txt"

bench throughput 270 --batches 64 256 --paths official fast+compile+gelu --sample-batches 64
status=$?

limit=$(($(left) - 150))
[ "$limit" -gt 160 ] && limit=160
if [ "$limit" -ge 60 ]; then
	timed end_to_end "$limit" "$PY" -m selfflow.batch.bench --batch-size 64 --num-steps 250 \
		--batches 3 "${E2E[@]}" || status=1
else
	echo "=== end_to_end skipped: $(left) s left ==="
fi

limit=$(($(left) - 40))
if [ "$limit" -ge 60 ]; then
	bench variants "$limit" --batches 64 --error-steps 0 \
		--paths official fast fast+gelu fast+compile fast+compile+gelu fast+compile+cudnn+gelu
fi

limit=$(($(left) - 5))
if [ "$limit" -ge 30 ]; then
	timed eval_speed "$limit" "$PY" benchmarks/eval_speed.py --synthetic "${EVAL[@]}"
else
	echo "=== eval_speed skipped: $(left) s left ==="
fi

echo "=== summary ($SECONDS s) ==="
for name in throughput variants; do
	[ -f "$OUT/$name.log" ] && sed -n '/^## Throughput/,$p' "$OUT/$name.log"
done
[ -f "$OUT/end_to_end.log" ] && grep -E '^\||end-to-end /|^device' "$OUT/end_to_end.log"
exit "$status"
