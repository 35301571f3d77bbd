#!/usr/bin/env bash
# The one device check of the fast training step, for an H100 or H200.
#
#   bash benchmarks/train_gpu_check.sh      # from the repository root; time-boxed to 9 minutes
#
# Needs python3 with CUDA PyTorch (the package need not be installed: src/ goes on PYTHONPATH).
# Stops at once, exit status 2, when CUDA is not available. Runs, each time-boxed so that the
# whole script ends within $BUDGET seconds (compilation included), in order of importance. The
# train run gets the most (330 s): each batch size compiles its own graphs (on the H200 of
# 2026-11-26 one sampling graph took 40-50 s), and a later process finds them in Inductor's
# cache; time a run leaves unused goes to the variants:
#   1. train: benchmarks/train_throughput.py on SiT-XL/2 with random weights: the straightforward
#      step and the fast step at per-GPU batch 64, 128 and 32 (the two the claim needs first;
#      images/s, MFU, peak memory, host syncs per step), then both trained 20 steps from the same
#      weights and batches against the float32 reference (losses and gradient norms) at batch 32,
#      right after batch 32's timings (its graphs are compiled then; the float32 reference is
#      cheapest there); last, one warm step of each at batch 64 under torch.profiler
#      ($OUT/train_profile.txt: the kernels that take the time, for when a target is missed);
#   2. loop: benchmarks/train_loop.py on XL/2 at batch 64: `selfflow train` itself (memory-mapped
#      dataset, posterior re-sampling, keyed streams, prefetch, logs, a checkpoint at the end)
#      against its bare step, median of 10-step windows after a warm-up window, with the host's
#      time to draw one step's batch and the time the XL/2 checkpoint took to write;
#   3. variants, if time is left: at batch 32 the fast step without torch.compile (what compiling
#      buys) and the compiled fast step in float32, both trained 20 steps against the float32
#      reference: the float32 one must follow it to float32 rounding (the device's compiled maths).
# Writes $OUT/nvidia-smi.txt and NAME.log, NAME.json per run. The JSON is rewritten after every
# figure, so a run stopped at its time limit keeps what it measured. A CPU dry run:
#   BENCH_ARGS="--tiny --device cpu --batches 4 8" LOOP_ARGS="--steps 20" ALLOW_CPU=1 \
#     bash benchmarks/train_gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-$PWD/train_gpu_check_out}"
BUDGET="${BUDGET:-540}"
PY="${PYTHON:-python3}"
read -r -a EXTRA <<<"${BENCH_ARGS:-}"
read -r -a LOOP_ARGS <<<"${LOOP_ARGS:---model XL/2 --batch 64 --steps 50 --log-every 10}"
mkdir -p "$OUT"
export PYTHONPATH="$PWD/src${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1

left() { echo $((BUDGET - SECONDS)); }

(nvidia-smi || echo "nvidia-smi not available") 2>&1 | tee "$OUT/nvidia-smi.txt"
if ! "$PY" -c "import torch, sys; print('torch', torch.__version__, 'cuda', torch.version.cuda, \
'device', torch.cuda.get_device_name(0) if torch.cuda.is_available() else None); \
sys.exit(0 if torch.cuda.is_available() else 1)" 2>&1 | tee -a "$OUT/nvidia-smi.txt"; then
	if [ -z "${ALLOW_CPU:-}" ]; then
		echo "=== no CUDA device: nothing to measure (set ALLOW_CPU=1 for a dry run) ==="
		exit 2
	fi
fi

bench() { # bench NAME SECONDS ARGS...: one time-boxed benchmarks/train_throughput.py run
	local name=$1 limit=$2
	shift 2
	echo "=== $name (limit ${limit} s, $(left) s left) ==="
	timeout --kill-after=10 "$limit" "$PY" benchmarks/train_throughput.py "$@" "${EXTRA[@]}" \
		--out "$OUT/$name.json" 2>&1 | tee "$OUT/$name.log"
	local rc=${PIPESTATUS[0]}
	[ "$rc" = 124 ] && echo "=== $name stopped at its ${limit} s limit ==="
	return "$rc"
}

bench train 330 --batches 64 128 32 --paths straightforward fast --compare-steps 20 \
	--compare-batch 32 --profile "$OUT/train_profile.txt"
status=$?

echo "=== loop (limit 150 s, $(left) s left) ==="
timeout --kill-after=10 150 "$PY" benchmarks/train_loop.py "${LOOP_ARGS[@]}" \
	--out "$OUT/loop.json" 2>&1 | tee "$OUT/loop.log"
[ "${PIPESTATUS[0]}" = 0 ] || status=1

limit=$(($(left) - 10))
if [ "$limit" -ge 60 ]; then
	bench variants "$limit" --batches 32 --paths fast-eager fast-float32 --repeats 5 \
		--compare-steps 20 || status=1
else
	echo "=== variants skipped: $(left) s left ==="
fi

echo "=== summary ($SECONDS s) ==="
for name in train variants; do
	[ -f "$OUT/$name.log" ] && sed -n '/^## Training throughput/,$p' "$OUT/$name.log"
done
[ -f "$OUT/loop.log" ] && sed -n '/^| run/,$p' "$OUT/loop.log"
exit "$status"
