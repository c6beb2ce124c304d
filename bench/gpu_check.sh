#!/usr/bin/env bash
# The project's GPU check in one run, for a CUDA machine lent for a few minutes: the issue's
# targets (bench/gpu_targets.py), the `gpu`-marked tests, the compiled forwards, then the
# whole suite on the CUDA host. Each step has its own time limit; the most wanted come first.
#
# The machine has PyTorch but not the service's other wheels, and none of ../shared.
# Prepare once, here, from the project root (.gpu/ is ignored by git; it travels with
# `carry: [".gpu"]`):
#   echo /.gpu/ >> .git/info/exclude
#   mkdir -p .gpu/datasets && cp -r ../shared/gpu ../shared/weights .gpu/ \
#     && cp -r ../shared/datasets/Set5 ../shared/datasets/Set14 .gpu/datasets/
#   python3 -m pip download --no-deps --only-binary=:all: --python-version 3.12 \
#     --implementation cp --platform manylinux_2_28_x86_64 --platform manylinux_2_17_x86_64 \
#     --platform manylinux2014_x86_64 -d .gpu/extra isal simplejpeg fastapi-offline==1.7.7 \
#     py-spy httptools
# (httptools: the HTTP parser uvicorn[standard] puts in the image). Then, on the device:
# `bash bench/gpu_check.sh [STEP...]` (the default steps: under 10 minutes; logs in $OUT or
# /tmp/gpu_out). Try it here first with GPU_CHECK_NO_INSTALL=1 and a python3 that has the
# project's packages: on the CPU the gpu tests skip and the targets run --quick.
set -u
O=${OUT:-/tmp/gpu_out}
mkdir -p "$O"
ROOT=$PWD
S=$ROOT/.gpu
export PYTHONUNBUFFERED=1 IMDN_SHARED_DIR=${IMDN_SHARED_DIR:-$S} PYTHONPATH=$ROOT
if [ -z "${GPU_CHECK_NO_INSTALL:-}" ]; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site "$S"/gpu/wheels/*.whl "$S"/extra/*.whl || exit 1
  export PYTHONPATH=/tmp/site:$ROOT PATH=/tmp/site/bin:$PATH  # py-spy's binary too
fi
step() {  # step NAME SECONDS COMMAND...: run with a limit, log to $O/NAME.txt, say how it ended
  local name=$1 limit=$2 started=$SECONDS
  shift 2
  echo "=== $name (limit ${limit}s)"
  timeout "$limit" "$@" >"$O/$name.txt" 2>&1
  echo "=== $name: exit $? after $((SECONDS - started))s" | tee -a "$O/$name.txt"
}
python3 -c 'import torch; print("torch", torch.__version__, "cuda", torch.cuda.is_available(),
  torch.cuda.get_device_name(0) if torch.cuda.is_available() else "")'
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader 2>/dev/null
quick=()
python3 -c 'import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)' || quick=(--quick)
frames='["1080x1920"]'  # a frame bucket of the frame the targets send (--quick sends 68x120)
device=cuda threads=(--rounds 20)  # bench.device_thread's device and rounds
[ ${#quick[@]} -eq 0 ] || { frames='["68x120"]'; device=cpu threads=(--jobs 8 --rounds 2); }
steps=("$@")
[ $# -gt 0 ] || steps=(gpu_tests targets targets_frames frames_compiled suite_device gpu_compile_test)
for s in "${steps[@]}"; do
  case $s in
  gpu_tests)  # fp16 Set5 PSNR within 0.02 dB of fp32, modes, tiles (eager)
    step gpu_tests 60 python3 -m pytest -q -p no:cacheprovider -o addopts= -k "not compile" \
      tests/test_gpu.py
    tail -n 3 "$O/gpu_tests.txt" ;;
  targets)  # the issue's targets with the CUDA defaults (fp16, buckets, CUDA graphs), py-spy'd
    step targets 100 python3 -m bench.gpu_targets "${quick[@]}" --profile "$O/profile"
    tail -n 27 "$O/targets.txt" ;;
  targets_python_switch)  # the targets at Python's GIL switch interval (5 ms), for comparison
    step targets_python_switch 100 env IMDN_GIL_SWITCH_INTERVAL_MS=5 python3 -m bench.gpu_targets \
      "${quick[@]}"
    tail -n 27 "$O/targets_python_switch.txt" ;;
  targets_frames)  # the same with a whole-frame bucket for the 1080p frames (the plain forward)
    step targets_frames 90 env IMDN_FRAME_BUCKETS="$frames" python3 -m bench.gpu_targets \
      "${quick[@]}"
    tail -n 27 "$O/targets_frames.txt" ;;
  frames_compiled)  # the 4K target alone, its frame's plain forward compiled (x2: 4 graphs)
    step frames_compiled 120 env IMDN_FRAME_BUCKETS="$frames" IMDN_BACKEND=compile \
      IMDN_COMPILE_MODE=default IMDN_MAX_BATCH_SIZE=4 python3 -m bench.gpu_targets \
      "${quick[@]}" --frames-only
    tail -n 6 "$O/frames_compiled.txt" ;;
  gpu_compile_test)  # the compiled backend through the engine: x4's 3 full graphs, mode default
    step gpu_compile_test 120 python3 -m pytest -q -p no:cacheprovider -o addopts= \
      -k compile tests/test_gpu.py
    grep -E "compiled|passed|failed|Error" "$O/gpu_compile_test.txt" | tail -n 8 ;;
  video)  # a video end to end (decode, engine, NVENC, mux) against the network alone, 1080p
    # x2 with its frame bucket (needs PyAV: add `av` to the wheels downloaded into .gpu/extra)
    n=60
    [ ${#quick[@]} -eq 0 ] || n=4
    step video 150 env IMDN_FRAME_BUCKETS="$frames" python3 -m bench.video \
      --size "$(echo "$frames" | tr -d '[]"')" --scale 2 --frames "$n" --rounds 1
    tail -n 3 "$O/video.txt" ;;
  server_overhead)  # the server's own CPU and GIL time per request on this host's cores
    step server_overhead 90 bash -c "python3 -m bench.server_overhead --clients 16 --gil \
      && python3 -m bench.server_overhead --frame --clients 16 --rounds 20 --gil"
    grep -E "requests/s|per request" "$O/server_overhead.txt" ;;
  device_thread)  # the device thread's torch calls and time per batch of 32 small requests,
    # beside busy Python threads: the stand-in network (the calls), then x3's, graphed
    step device_thread 90 bash -c "python3 -m bench.device_thread --device $device ${threads[*]} \
      && python3 -m bench.device_thread --device $device --network imdn ${threads[*]}"
    grep -E "network|calls|per batch" "$O/device_thread.txt" ;;
  batch_split)  # batches split by the warm-up's timings against padded ones, in process
    step batch_split 90 python3 -m bench.batch_split "${quick[@]}" --clients 8 --rounds 3
    tail -n 3 "$O/batch_split.txt" ;;
  compiled)  # the frame's forward eager and compiled, with the kernels each spends it on
    step compiled 150 python3 -m bench.gpu_targets "${quick[@]}" --forward-only --kernels 15 \
      --compile default max-autotune-no-cudagraphs
    grep -E "forward, " "$O/compiled.txt" ;;
  compiled_tuned)  # the frame's forward compiled with inductor's coordinate-descent tuning
    step compiled_tuned 150 python3 -m bench.gpu_targets "${quick[@]}" --forward-only \
      --kernels 15 --compile max-autotune-no-cudagraphs \
      --inductor coordinate_descent_tuning=true
    grep -E "forward, " "$O/compiled_tuned.txt" ;;
  compiled_fused)  # the frame's forward without channel splits, and its 1x1 convolutions
    # as matrix products that inductor may fuse the gate, bias and residual into
    step compiled_fused 150 python3 -m bench.gpu_targets "${quick[@]}" --forward-only \
      --kernels 15 --split-free --compile max-autotune-no-cudagraphs \
      --inductor conv_1x1_as_mm=true
    grep -E "forward, " "$O/compiled_fused.txt" ;;
  suite)  # the whole suite on the CUDA host (modules needing dev-only packages don't collect);
    # 4 workers of 4 torch threads: 12 workers of 16 threads each on 16 cores got 17 % of
    # the device-facing modules done in 100 s (docs/benchmarks.md, section 8)
    step suite 170 env OMP_NUM_THREADS=4 python3 -m pytest -v -p no:cacheprovider \
      -o addopts= -n 4 --timeout 100 \
      --continue-on-collection-errors -m "not slow and not gpu" tests
    grep -E " (FAILED|ERROR) |^ERROR|passed|failed" "$O/suite.txt" | tail -n 30 ;;
  suite_device)  # the suite's modules that touch the device, the engine or the server
    step suite_device 100 env OMP_NUM_THREADS=4 python3 -m pytest -v -p no:cacheprovider \
      -o addopts= -n 4 --timeout 100 -m "not slow and not gpu" tests/test_service.py \
      tests/test_runner.py tests/test_reliability.py tests/test_backend.py \
      tests/test_observability.py tests/test_metrics.py tests/test_bench.py \
      tests/test_masked.py tests/test_evaluate.py tests/test_engine.py tests/test_cli.py
    grep -E " (FAILED|ERROR) |^ERROR|passed|failed" "$O/suite_device.txt" | tail -n 30 ;;
  *) echo "unknown step $s"; exit 2 ;;
  esac
done
