#!/usr/bin/env bash
# The GPU validation behind benchmarks/results/2xH200/: what was run, in which order, with which limits.
#
# Runs ON a machine with 2 GPUs, from the repository root, after DeepEP was staged and built there
# (see benchmarks/README.md "On the 2 x H200 machine"; DeepEP is built from its own sources by the
# operator, this repository ships no build script). Each step has its own time limit, so one hang costs
# that step only; every step's output lands in RES (default /tmp/mep_results) and RES is re-archived to
# OUT/results.tgz after each step, so a run cut short still returns what it finished.
#
#   bash benchmarks/gpu/validate.sh STAGE [STAGE ...]
#     deepep     DeepEP main tree (legacy + elastic): GPU tests, ep_bench (bf16 T=4096 with torch and
#                ncclep, a token sweep 128..16384, fp8, T=8192)
#     profile    the torch backend's time per piece, before (old implementation) and after
#     train      examples/train_moe.py with torch, legacy, elastic, and elastic activated by env alone
#     hybridep   DeepEP hybrid-ep tree: GPU test, ep_bench, train_moe for hybridep
#     ncclep     nccl.ep (nccl-extensions): GPU test, ep_bench, train_moe for ncclep
#     lease1     one ~9 minute command: GPU tests (DeepEP main tree + nccl.ep, torch backend's graph and sync tests),
#                ep_bench bf16 T=4096 with torch, legacy, elastic and ncclep in one run, the token sweep, fp8
#     lease2     the next one: hybridep (GPU test, ep_bench, train_moe), ncclep train_moe, T=8192
#     lease3a    GPU tests on the main tree (not hybridep, not ncclep), ep_bench bf16 T=4096 with torch, legacy,
#                elastic and ncclep, the token sweep (each with the training path timed too)
#     lease3b    hybridep (GPU test, ep_bench, train_moe), trace_slot.py for legacy and elastic, host_gap.py, ncclep
#                agreeing once, the ncclep GPU test, fp8, T=8192
#     lease4     FP8 (legacy, elastic), ncclep agreeing once with MAX_TOKENS pinned, trace_slot.py for hybridep at
#                T=4096, hybridep with 128-aligned rows
#     lease6     torch backend GPU tests, ep_bench bf16 T=4096 torch+legacy+elastic, hybridep (GPU test, ep_bench,
#                train_moe), torch at T=8192
#     lease7     torch GPU tests, ep_bench T=4096 torch+legacy+elastic, hybridep (GPU tests incl. its routing-map graph,
#                ep_bench, train_moe), torch token sweep, trace_slot.py for hybridep at T=4096
#     lease8     hybridep: GPU tests, ep_bench with the routing-map graph on and off (alternating, twice), trace_slot.py
#                at T=4096, train_moe
#     lease9     hybridep syncing once per dispatch (HybridEP's preprocessing): torch GPU tests (CUDA-graph refactor),
#                hybridep GPU tests (incl. no torch-visible sync), ep_bench twice, train_moe; legacy/elastic at 128..1024
#                with no build running
#     lease10    hybridep only (the main tree's build not started): GPU tests, ep_bench with the scan's counts on and
#                off (MCORE_EP_HYBRIDEP_SCAN_COUNTS, alternating, twice), train_moe, trace_slot.py at T=4096
#     lease11    hybridep only: hybridep_ab.py (scan vs copy vs bare, one process, round robin), ep_bench, trace_slot.py
#     lease12    hybridep only, short: ep_bench (conformance + plugin/direct), hybridep_ab.py (ids beside the dispatch
#                kernel or after it), then its GPU tests against the reference and graph vs eager
#     small_t    legacy/elastic at 128..1024 tokens with the paths alternating in rounds (--rounds 6), the
#                DeepEP main tree only, no other build running: issue 11's plugin/direct at small T without drift
#     lease13    small_t, then the torch backend's one-pass combine sum: combine_sum_ab.py (one GPU: eager, Triton,
#                torch.compile), ep_bench torch at 4096..16384 with MCORE_EP_TORCH_FUSED_SUM=1 and 0 alternating twice,
#                the torch GPU tests; then hybridep's GPU tests (reference, graph, sync) on its cumsum ids
#     lease14    small_t again (and a clean exit of a legacy+elastic sweep), the torch token sweep 128..16384 with the
#                one-pass combine sum, bf16 T=4096 torch+legacy+elastic in one run
#     lease15    torch only: a2a_host_cost.py (the c10d wrapper vs the ProcessGroup call), T=4096 in three processes, trace
#     lease16    torch only: host_speed.sh (per-vCPU Python speed; T=4096 unpinned, and each rank pinned to 8 vCPUs)
#     lease17    small_t three times, each report with its ranks' host speed (main tree only; hybridep not built)
#     lease18    exit_check.py: legacy and elastic, the job ending with destroy_process_group() while the plugin holds
#                its buffers, with the process group alive, and after releasing them first (main tree only)
#     lease19a   the destroy_process_group hook on the GPU (exit_check.py install mode, legacy and elastic; destroy
#                without it as the control), the torch GPU tests, host_overhead.py on this host (CPU and CUDA
#                tensors); at 19a8d88 also torch_meta_ab.py (the torch backend's metadata inside the header exchange
#                against its own collective: no gain, so the variant and the script were removed)
#     lease19b   the torch token sweep and bf16 T=4096 torch+legacy+elastic (at 19a8d88 the torch rows ran the
#                metadata-in-header variant); small T in rounds twice (issue 11, each report with its ranks' host speed)
#     gap        small_t_gap.py: issue 11's plugin/direct gap at 256 tokens built up piece by piece, legacy and
#                elastic each in its own process
#     torch_only the torch backend with torch's own NCCL, no DeepEP: GPU tests, T=4096, T=8192, token sweep, time per
#                piece (against the .sum(1) combine), trace at T=4096
#     lease5     nccl.ep only (wheels installed, no DeepEP build started): ncclep agreeing once, T=256 and 4096;
#                the torch backend's one-host-sync GPU test
#     ncclep_only  NCCL 2.30.7 + nccl.ep, no DeepEP build: ep_bench torch+ncclep (T=256, 4096; bare nccl.ep as
#                "direct"), tests/test_gpu.py -k ncclep, host_gap.py for torch and ncclep, ncclep agreeing once
#   Environment: DEEPEP_DIR (/tmp/deepep), HYBRIDEP_DIR (/tmp/hybridep), NCCLEP_SITE (/tmp/ncclep_site),
#   RES, OUT, STEPS (train steps, 20), PY (python3).
set -u
RES=${RES:-/tmp/mep_results}; OUT=${OUT:-/tmp/mep_out}; PY=${PY:-python3}; STEPS=${STEPS:-20}
DEEPEP_DIR=${DEEPEP_DIR:-/tmp/deepep}; HYBRIDEP_DIR=${HYBRIDEP_DIR:-/tmp/hybridep}
NCCLEP_SITE=${NCCLEP_SITE:-/tmp/ncclep_site}
mkdir -p "$RES" "$OUT"
export NCCL_NVLS_ENABLE=0 TORCH_SYMM_MEM_DISABLE_MULTICAST=1 NVSHMEM_DISABLE_NVLS=1 PYTHONUNBUFFERED=1
export CUDA_HOME=${CUDA_HOME:-/usr/local/cuda} EP_JIT_CACHE_DIR=${EP_JIT_CACHE_DIR:-/tmp/ep_jit_cache}
export PATH=$CUDA_HOME/bin:$PATH EP_DISABLE_GIN=1 MCORE_EP_LOG=warning
ROOT=$(pwd)
BASE_PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}

archive() { tar czf "$OUT/results.tgz" -C "$RES" . 2>/dev/null; }
DEADLINE=${DEADLINE:-0}  # epoch seconds; steps are shortened or skipped to end before it (0: no deadline)
step() {  # step NAME LIMIT_S COMMAND...: run with a limit, log to RES/NAME.log, record rc and wall time
  local name=$1 limit=$2; shift 2
  local t0=$(date +%s)
  if [ "$DEADLINE" -gt 0 ]; then
    local left=$(( DEADLINE - t0 ))
    if [ "$left" -lt 40 ]; then echo "$name skipped (deadline)" | tee -a "$RES/steps.txt"; return 0; fi
    [ "$limit" -gt "$left" ] && limit=$left
  fi
  echo "=== [$name] $(date -u +%H:%M:%S) limit ${limit}s: $*"
  timeout -k 10 "$limit" bash -c '"$@"' "$name" "$@" > "$RES/$name.log" 2>&1
  local rc=$?
  local dt=$(( $(date +%s) - t0 ))
  echo "$name rc=$rc wall=${dt}s" | tee -a "$RES/steps.txt"
  tail -n 25 "$RES/$name.log"
  archive
  return 0
}
tree() { export PYTHONPATH=$1:$BASE_PYTHONPATH; }
run2() { $PY -m torch.distributed.run --standalone --nproc-per-node 2 "$@"; }
bench() { run2 benchmarks/ep_bench.py --plot --out "$RES/bench" "$@"; }
train() {  # train NAME ARGS...: the main job, 2 processes (NCCL), bf16 on CUDA
  local name=$1; shift
  $PY examples/train_moe.py --steps "$STEPS" --seed 1234 --json-out "$RES/train/$name.json" "$@"
}
export -f run2 bench train
export RES PY STEPS
mkdir -p "$RES/bench" "$RES/train"

machine_info() {
  { date -u; nvidia-smi --query-gpu=name,memory.total,driver_version --format=csv; nvidia-smi topo -m
    $PY - <<'PY'
import ctypes, torch, platform
torch.zeros(1, device="cuda")
v = ctypes.c_int(); ctypes.CDLL("libnccl.so.2").ncclGetVersion(ctypes.byref(v))
print("python", platform.python_version(), "torch", torch.__version__, "cuda", torch.version.cuda,
      "nccl loaded", v.value, "nccl compiled", torch.cuda.nccl.version())
PY
  } > "$RES/machine.txt" 2>&1
}

hybridep_steps() {  # hybridep_steps TEST_LIMIT BENCH_LIMIT TRAIN_LIMIT: the hybrid-ep tree's test, bench and training
  tree "$HYBRIDEP_DIR"
  $PY -m megatron_ep_plugins.cli list > "$RES/list_hybridep.txt" 2>&1
  step gpu_tests_hybridep "$1" $PY -m pytest -v -rA tests/test_gpu.py -k "hybridep" --junitxml "$RES/gpu_tests_hybridep.xml"
  step bench_hybridep_T4096 "$2" bench --backends torch,hybridep --iters 30 --name hybridep_bf16_T4096
  step train_hybridep "$3" train hybridep --backend hybridep
}

for stage in "$@"; do
  case $stage in
    deepep)
      tree "$DEEPEP_DIR"; machine_info
      $PY -c 'import deep_ep; print(deep_ep.__file__, getattr(deep_ep, "__version__", "?"))' > "$RES/deepep_tree.txt" 2>&1
      $PY -m megatron_ep_plugins.cli list > "$RES/list_deepep.txt" 2>&1
      step gpu_tests_deepep 200 $PY -m pytest -v -rA tests/test_gpu.py -k "not hybridep and not ncclep" --junitxml "$RES/gpu_tests_deepep.xml"
      step bench_bf16_T4096 150 bench --backends torch,legacy,elastic --name bf16_T4096
      step bench_sweep 170 bench --backends torch,legacy,elastic --tokens 128,256,512,1024,2048,4096,8192,16384 --iters 20 --warmup 3 --name sweep
      step bench_fp8_T4096 70 bench --backends legacy,elastic --fp8 --iters 30 --name fp8_T4096
      step bench_bf16_T8192 70 bench --backends torch,legacy,elastic --tokens 8192 --iters 30 --name bf16_T8192
      ;;
    profile)
      tree "$DEEPEP_DIR"
      if [ -f .payload_extra/old_torch_a2a.py ]; then
        step profile_torch_before 60 run2 benchmarks/profile_torch_backend.py --impl .payload_extra/old_torch_a2a.py --out "$RES/profile_before"
      fi
      step profile_torch_after 60 run2 benchmarks/profile_torch_backend.py --out "$RES/profile_after"
      ;;
    core)  # the most important runs first, for a short device lease
      tree "$DEEPEP_DIR"; machine_info
      $PY -m megatron_ep_plugins.cli list > "$RES/list_deepep.txt" 2>&1
      step bench_bf16_T4096 120 bench --backends torch,legacy,elastic --name bf16_T4096
      step bench_sweep 150 bench --backends torch,legacy,elastic --tokens 128,256,512,1024,2048,4096,8192,16384 --iters 20 --warmup 3 --name sweep
      step train_torch 90 train torch --backend torch
      step train_legacy 90 train legacy --backend legacy
      step train_elastic 100 train elastic --backend elastic
      step train_elastic_env 100 env MCORE_EP_BACKEND=elastic $PY examples/train_moe.py --no-install --steps "$STEPS" --seed 1234 --json-out "$RES/train/elastic_env.json"
      step gpu_tests_deepep 150 $PY -m pytest -v -rA tests/test_gpu.py -k "not hybridep and not ncclep" --junitxml "$RES/gpu_tests_deepep.xml"
      step bench_fp8_T4096 60 bench --backends legacy,elastic --fp8 --iters 30 --name fp8_T4096
      step bench_bf16_T8192 60 bench --backends torch,legacy,elastic --tokens 8192 --iters 30 --name bf16_T8192
      ;;
    train)
      tree "$DEEPEP_DIR"
      step train_torch 100 train torch --backend torch
      step train_legacy 100 train legacy --backend legacy
      step train_elastic 120 train elastic --backend elastic
      # activated by the environment alone: the .pth hook installs when Megatron's dispatcher is imported
      step train_elastic_env 120 env MCORE_EP_BACKEND=elastic $PY examples/train_moe.py --no-install --steps "$STEPS" --seed 1234 --json-out "$RES/train/elastic_env.json"
      ;;
    hybridep)
      hybridep_steps 150 100 120
      ;;
    ncclep)
      tree "$DEEPEP_DIR:$NCCLEP_SITE"
      $PY -m megatron_ep_plugins.cli list > "$RES/list_ncclep.txt" 2>&1
      step gpu_tests_ncclep 150 $PY -m pytest -v -rA tests/test_gpu.py -k "ncclep" --junitxml "$RES/gpu_tests_ncclep.xml"
      step bench_ncclep_T4096 150 bench --backends torch,legacy,elastic,ncclep --iters 30 --name ncclep_bf16_T4096
      step train_ncclep 120 train ncclep --backend ncclep
      ;;
    lease1)
      tree "$DEEPEP_DIR:$NCCLEP_SITE"; machine_info
      $PY -m megatron_ep_plugins.cli list > "$RES/list_deepep.txt" 2>&1
      step gpu_tests_deepep 170 $PY -m pytest -v -rA tests/test_gpu.py tests/test_torch_backend.py::test_gpu_one_host_sync_per_dispatch_none_per_combine -k "not hybridep" --junitxml "$RES/gpu_tests_deepep.xml"
      step bench_bf16_T4096 140 bench --backends torch,legacy,elastic,ncclep --iters 30 --name bf16_T4096
      step bench_sweep 150 bench --backends torch,legacy,elastic --tokens 128,256,512,1024,2048,4096,8192,16384 --iters 20 --warmup 3 --name sweep
      step bench_fp8_T4096 60 bench --backends legacy,elastic --fp8 --iters 30 --name fp8_T4096
      ;;
    lease2)
      hybridep_steps 110 90 100
      tree "$DEEPEP_DIR:$NCCLEP_SITE"
      step train_ncclep 100 train ncclep --backend ncclep
      step bench_bf16_T8192 60 bench --backends torch,legacy,elastic --tokens 8192 --iters 30 --name bf16_T8192
      ;;
    ncclep_only)
      export PYTHONPATH=$ROOT:$NCCLEP_SITE${PYTHONPATH:+:$PYTHONPATH}; machine_info
      step bench_ncclep_torch 75 bench --backends torch,ncclep --tokens 256,4096 --iters 20 --warmup 5 --name ncclep_torch
      step gpu_tests_ncclep 90 $PY -m pytest -v -rA tests/test_gpu.py -k "ncclep" --junitxml "$RES/gpu_tests_ncclep.xml"
      step host_gap 45 env GAP_BACKENDS=torch,ncclep GAP_TOKENS=256,4096 GAP_ITERS=30 $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/host_gap.py
      step bench_ncclep_once 45 env MCORE_EP_NCCLEP_CHECK_EACH_DISPATCH=0 bash -c 'bench --backends ncclep --tokens 256,4096 --iters 20 --warmup 5 --name ncclep_once'
      ;;
    lease3a)  # one ~9 minute command: DeepEP main tree + nccl.ep on the path
      tree "$DEEPEP_DIR:$NCCLEP_SITE"; machine_info
      $PY -m megatron_ep_plugins.cli list > "$RES/list_deepep.txt" 2>&1
      step gpu_tests_deepep 200 $PY -m pytest -v -rA tests/test_gpu.py tests/test_torch_backend.py::test_gpu_one_host_sync_per_dispatch_none_per_combine -k "not hybridep and not ncclep" --junitxml "$RES/gpu_tests_deepep.xml"
      step bench_bf16_T4096 120 bench --backends torch,legacy,elastic,ncclep --iters 30 --name bf16_T4096
      step bench_sweep 150 bench --backends torch,legacy,elastic --tokens 128,256,512,1024,2048,4096,8192,16384 --iters 20 --warmup 3 --name sweep
      ;;
    lease3b)  # the next one: hybridep's tree, then diagnostics and the rest on the main tree
      hybridep_steps 110 90 100
      tree "$DEEPEP_DIR:$NCCLEP_SITE"
      for b in legacy elastic; do
        step trace_slot_$b 50 env TRACE_BACKEND=$b TRACE_OUT="$RES" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/trace_slot.py
      done
      step host_gap 40 env GAP_BACKENDS=legacy,elastic,torch GAP_TOKENS=256,4096 GAP_ITERS=30 $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/host_gap.py
      step bench_ncclep_once 45 env MCORE_EP_NCCLEP_CHECK_EACH_DISPATCH=0 bash -c 'bench --backends ncclep --tokens 256,4096 --iters 20 --warmup 5 --name ncclep_once'
      step gpu_tests_ncclep 90 $PY -m pytest -v -rA tests/test_gpu.py -k "ncclep" --junitxml "$RES/gpu_tests_ncclep.xml"
      step bench_fp8_T4096 50 bench --backends legacy,elastic --fp8 --iters 30 --name fp8_T4096
      step bench_bf16_T8192 50 bench --backends torch,legacy,elastic --tokens 8192 --iters 30 --name bf16_T8192
      ;;
    lease4)  # a short last command: FP8, nccl.ep agreeing once with a pinned size, hybridep's time per piece
      tree "$DEEPEP_DIR:$NCCLEP_SITE"
      step bench_fp8_T4096 50 bench --backends legacy,elastic --fp8 --iters 30 --name fp8_T4096
      step bench_ncclep_once 45 env MCORE_EP_NCCLEP_CHECK_EACH_DISPATCH=0 MCORE_EP_NCCLEP_MAX_TOKENS_PER_RANK=4096 bash -c 'bench --backends ncclep --tokens 256,4096 --iters 20 --warmup 5 --name ncclep_once'
      for i in $(seq 60); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$HYBRIDEP_DIR"
      step trace_slot_hybridep 50 env TRACE_BACKEND=hybridep TRACE_T=4096 TRACE_ITERS=10 TRACE_OUT="$RES" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/trace_slot.py
      step bench_hybridep_align128 50 env MCORE_EP_HYBRIDEP_ROW_WIDTH_ALIGN=128 bash -c 'bench --backends hybridep --iters 30 --name hybridep_align128_T4096'
      ;;
    lease5)  # nccl.ep only, no DeepEP build running (host-bound numbers): ncclep agreeing once after its hot-path trim
      export PYTHONPATH=$ROOT:$NCCLEP_SITE${PYTHONPATH:+:$PYTHONPATH}; machine_info
      step bench_ncclep_once 70 env MCORE_EP_NCCLEP_CHECK_EACH_DISPATCH=0 MCORE_EP_NCCLEP_MAX_TOKENS_PER_RANK=4096 bash -c 'bench --backends ncclep --tokens 256,4096 --iters 30 --warmup 5 --name ncclep_once'
      step gpu_tests_torch_sync 45 $PY -m pytest -v -rA tests/test_torch_backend.py::test_gpu_one_host_sync_per_dispatch_none_per_combine
      ;;
    lease6)  # hybridep without appended id columns, the torch backend's combine add, in one command after staging
      tree "$DEEPEP_DIR:$NCCLEP_SITE"; machine_info
      $PY -m megatron_ep_plugins.cli list > "$RES/list_deepep.txt" 2>&1
      step gpu_tests_torch 80 $PY -m pytest -v -rA tests/test_gpu.py tests/test_torch_backend.py::test_gpu_one_host_sync_per_dispatch_none_per_combine -k "torch or one_host_sync" --junitxml "$RES/gpu_tests_torch.xml"
      step bench_bf16_T4096 120 bench --backends torch,legacy,elastic --iters 30 --name bf16_T4096
      for i in $(seq 60); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      hybridep_steps 100 80 90
      tree "$DEEPEP_DIR:$NCCLEP_SITE"
      step bench_torch_T8192 60 bench --backends torch --tokens 8192 --iters 30 --name torch_T8192
      ;;
    lease7)  # after the hybridep routing-map graph and the torch header trims: tests, T=4096, hybridep, torch sweep
      tree "$DEEPEP_DIR:$NCCLEP_SITE"; machine_info
      $PY -m megatron_ep_plugins.cli list > "$RES/list_deepep.txt" 2>&1
      step gpu_tests_torch 70 $PY -m pytest -v -rA tests/test_gpu.py tests/test_torch_backend.py::test_gpu_one_host_sync_per_dispatch_none_per_combine -k "torch or one_host_sync" --junitxml "$RES/gpu_tests_torch.xml"
      step bench_bf16_T4096 110 bench --backends torch,legacy,elastic --iters 30 --name bf16_T4096
      for i in $(seq 60); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$HYBRIDEP_DIR"
      step gpu_tests_hybridep 110 $PY -m pytest -v -rA tests/test_gpu.py -k "hybridep" --junitxml "$RES/gpu_tests_hybridep.xml"
      step bench_hybridep_T4096 70 bench --backends torch,hybridep --iters 30 --name hybridep_bf16_T4096
      step train_hybridep 80 train hybridep --backend hybridep
      tree "$DEEPEP_DIR:$NCCLEP_SITE"
      step bench_torch_sweep 50 bench --backends torch --tokens 128,256,512,1024,2048,4096,8192,16384 --iters 20 --warmup 3 --name torch_sweep
      tree "$HYBRIDEP_DIR"
      step trace_slot_hybridep 50 env TRACE_BACKEND=hybridep TRACE_T=4096 TRACE_ITERS=10 TRACE_OUT="$RES" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/trace_slot.py
      ;;
    lease8)  # hybridep's received routing with 8-bit topk scores; routing-map graph on and off, alternating
      for i in $(seq 90); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$HYBRIDEP_DIR"; machine_info
      step gpu_tests_hybridep 110 $PY -m pytest -v -rA tests/test_gpu.py -k "hybridep" --junitxml "$RES/gpu_tests_hybridep.xml"
      for run in 1 2; do
        step bench_hybridep_graph_$run 55 bench --backends hybridep --iters 40 --name hybridep_graph_$run
        step bench_hybridep_eager_$run 55 env MCORE_EP_HYBRIDEP_CUDA_GRAPHS=0 bash -c "bench --backends hybridep --iters 40 --name hybridep_eager_$run"
      done
      step trace_slot_hybridep 50 env TRACE_BACKEND=hybridep TRACE_T=4096 TRACE_ITERS=10 TRACE_OUT="$RES" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/trace_slot.py
      step train_hybridep 80 train hybridep --backend hybridep
      ;;
    lease9)  # hybridep with one host sync per dispatch; the CUDA-graph refactor on the GPU; small T without builds
      tree "$DEEPEP_DIR"; machine_info
      step gpu_tests_torch 80 $PY -m pytest -v -rA tests/test_gpu.py tests/test_torch_backend.py::test_gpu_one_host_sync_per_dispatch_none_per_combine -k "torch or one_host_sync" --junitxml "$RES/gpu_tests_torch.xml"
      for i in $(seq 90); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$HYBRIDEP_DIR"
      $PY -m megatron_ep_plugins.cli list > "$RES/list_hybridep.txt" 2>&1
      step gpu_tests_hybridep 150 $PY -m pytest -v -rA tests/test_gpu.py -k "hybridep" --junitxml "$RES/gpu_tests_hybridep.xml"
      step bench_hybridep_1 55 bench --backends hybridep --iters 40 --name hybridep_onesync_1
      step train_hybridep 75 train hybridep --backend hybridep
      tree "$DEEPEP_DIR"
      step bench_small_T 70 bench --backends legacy,elastic --tokens 128,256,512,1024 --iters 50 --warmup 5 --name small_T
      tree "$HYBRIDEP_DIR"
      step bench_hybridep_2 55 bench --backends hybridep --iters 40 --name hybridep_onesync_2
      ;;
    lease10)  # hybridep: one host sync (the scan's counts) against two (dispatch + count copy), same process tree
      for i in $(seq 120); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$HYBRIDEP_DIR"; machine_info
      $PY -m megatron_ep_plugins.cli list > "$RES/list_hybridep.txt" 2>&1
      step gpu_tests_hybridep 150 $PY -m pytest -v -rA tests/test_gpu.py -k "hybridep" --junitxml "$RES/gpu_tests_hybridep.xml"
      for run in 1 2; do
        for scan in 1 0; do
          step bench_hybridep_scan${scan}_$run 50 env MCORE_EP_HYBRIDEP_SCAN_COUNTS=$scan bash -c "bench --backends hybridep --iters 40 --name hybridep_scan${scan}_$run"
        done
      done
      step train_hybridep 75 train hybridep --backend hybridep
      step trace_slot_hybridep 50 env TRACE_BACKEND=hybridep TRACE_T=4096 TRACE_ITERS=10 TRACE_OUT="$RES" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/trace_slot.py
      ;;
    lease11)  # hybridep: one sync vs two vs bare in one process (host-bound timings vary more between processes)
      for i in $(seq 120); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$HYBRIDEP_DIR"; machine_info
      step hybridep_ab 150 env AB_ROUNDS=10 AB_ITERS=30 AB_OUT="$RES/hybridep_ab.json" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/hybridep_ab.py
      step bench_hybridep 90 bench --backends hybridep --iters 40 --name hybridep_bf16_T4096
      step trace_slot_hybridep 50 env TRACE_BACKEND=hybridep TRACE_T=4096 TRACE_ITERS=10 TRACE_OUT="$RES" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/trace_slot.py
      ;;
    lease12)  # hybridep: received ids without topk, built on a side stream beside HybridEP's dispatch kernel
      for i in $(seq 120); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$HYBRIDEP_DIR"; machine_info
      step bench_hybridep 90 bench --backends hybridep --iters 40 --name hybridep_bf16_T4096
      step hybridep_ab 70 env AB_ROUNDS=10 AB_ITERS=30 AB_OUT="$RES/hybridep_ab.json" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/hybridep_ab.py
      step gpu_tests_hybridep 150 $PY -m pytest -v -rA tests/test_gpu.py -k "hybridep and (reference or graph or sync)" --junitxml "$RES/gpu_tests_hybridep.xml"
      ;;
    small_t)  # issue 11: small token counts, plugin / direct / Megatron's path alternating in rounds
      tree "$DEEPEP_DIR"; machine_info
      step bench_small_T_rounds 150 bench --backends legacy,elastic --tokens 128,256,512,1024 --iters 60 --rounds 6 --warmup 5 --name small_T_rounds
      ;;
    lease13)  # issue 11's small T in rounds (no build running); torch's one-pass combine sum on and off; hybridep's ids
      for i in $(seq 120); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$DEEPEP_DIR"; machine_info
      step bench_small_T_rounds 150 bench --backends legacy,elastic --tokens 128,256,512,1024 --iters 60 --rounds 6 --warmup 5 --name small_T_rounds
      step combine_sum_ab 60 env SUM_OUT="$RES/combine_sum_ab.json" $PY benchmarks/gpu/combine_sum_ab.py
      for pass in 1 2; do for fused in 1 0; do
        step bench_torch_fused${fused}_$pass 60 env MCORE_EP_TORCH_FUSED_SUM=$fused bash -c 'bench --backends torch --tokens 4096,8192,16384 --iters 20 --warmup 3 --name torch_fused'$fused'_'$pass
      done; done
      step gpu_tests_torch 90 $PY -m pytest -v -rA tests/test_gpu.py tests/test_torch_backend.py::test_gpu_one_host_sync_per_dispatch_none_per_combine -k "torch or one_host_sync or pair_sum" --junitxml "$RES/gpu_tests_torch.xml"
      tree "$HYBRIDEP_DIR"
      step gpu_tests_hybridep 150 $PY -m pytest -v -rA tests/test_gpu.py -k "hybridep and (reference or graph or sync)" --junitxml "$RES/gpu_tests_hybridep.xml"
      ;;
    lease14)  # after lease13: small T in rounds again (and whether a legacy+elastic sweep now exits cleanly), torch's
      # token sweep with the one-pass combine sum, bf16 T=4096 torch+legacy+elastic in one run
      for i in $(seq 120); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$DEEPEP_DIR"; machine_info
      step bench_small_T_rounds 150 bench --backends legacy,elastic --tokens 128,256,512,1024 --iters 60 --rounds 6 --warmup 5 --name small_T_rounds
      step bench_torch_sweep 150 bench --backends torch --tokens 128,256,512,1024,2048,4096,8192,16384 --iters 20 --warmup 3 --name torch_sweep
      step bench_bf16_T4096 120 bench --backends torch,legacy,elastic --iters 30 --name bf16_T4096
      ;;
    lease15)  # torch only (wheels installed, no DeepEP): host cost of one all_to_all_single by how it is called,
      # T=4096 in three processes (process-to-process spread with the one-pass sum), trace at T=4096
      export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}; machine_info
      step a2a_host_cost 60 env A2A_OUT="$RES/a2a_host_cost.json" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/a2a_host_cost.py
      for p in 1 2 3; do
        step bench_torch_T4096_p$p 50 bench --backends torch --tokens 4096 --iters 30 --name torch_T4096_p$p
      done
      step trace_torch 60 env TRACE_BACKEND=torch TRACE_T=4096 TRACE_ITERS=10 TRACE_OUT="$RES" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/trace_slot.py
      ;;
    lease16)  # torch only: is a slow host-bound process a slow vCPU? per-core Python speed, then T=4096 pinned and not
      export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}; machine_info
      step core_speed 60 bash benchmarks/gpu/host_speed.sh cores
      for run in a b; do
        step bench_torch_free_$run 50 bench --backends torch --tokens 4096 --iters 30 --name torch_T4096_free_$run
        step bench_torch_pin_lo_$run 50 bash benchmarks/gpu/host_speed.sh pinned 0-7 8-15 --backends torch --tokens 4096 --iters 30 --out "$RES/bench" --name torch_T4096_pin_lo_$run
        step bench_torch_pin_hi_$run 50 bash benchmarks/gpu/host_speed.sh pinned 16-23 24-31 --backends torch --tokens 4096 --iters 30 --out "$RES/bench" --name torch_T4096_pin_hi_$run
      done
      ;;
    lease17)  # issue 11 with each rank's host speed in the report: small T in rounds, three processes
      for i in $(seq 120); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$DEEPEP_DIR"; machine_info
      for run in a b c; do
        step bench_small_T_$run 80 bench --backends legacy,elastic --tokens 128,256,512,1024 --iters 60 --rounds 6 --warmup 5 --name small_T_rounds_$run
      done
      ;;
    lease18)  # does a job that used legacy/elastic through the plugin exit cleanly? exit_check.py, one launch per case
      for i in $(seq 120); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$DEEPEP_DIR"; machine_info
      for case in elastic:install elastic:destroy elastic:release elastic:plain legacy:destroy legacy:plain legacy:release; do
        step exit_${case%%:*}_${case##*:} 60 env EXIT_BACKEND=${case%%:*} EXIT_MODE=${case##*:} $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/exit_check.py
      done
      ;;
    lease19a)  # the teardown hook on the GPU; the torch GPU tests; the host cost per call on this VM
      for i in $(seq 120); do grep -q "build rc=" /tmp/build_hybridep.log 2>/dev/null && break; sleep 2; done
      tree "$DEEPEP_DIR"; machine_info
      for case in elastic:install legacy:install elastic:destroy; do
        step exit_${case%%:*}_${case##*:} 60 env EXIT_BACKEND=${case%%:*} EXIT_MODE=${case##*:} $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/exit_check.py
      done
      step gpu_tests_torch 90 $PY -m pytest -v -rA tests/test_gpu.py tests/test_torch_backend.py::test_gpu_one_host_sync_per_dispatch_none_per_combine -k "torch or one_host_sync or pair_sum" --junitxml "$RES/gpu_tests_torch.xml"
      # the no-work doubles replace deep_ep in this process: the real one is kept off the path
      step host_overhead_cpu 60 env PYTHONPATH=$BASE_PYTHONPATH $PY benchmarks/host_overhead.py --quick --out "$RES/host_overhead_cpu"
      step host_overhead_cuda 60 env PYTHONPATH=$BASE_PYTHONPATH $PY benchmarks/host_overhead.py --quick --device cuda --out "$RES/host_overhead_cuda"
      ;;
    lease19b)  # torch with the metadata in the header across T and beside DeepEP; issue 11's small T, twice
      tree "$DEEPEP_DIR"; machine_info
      step bench_torch_sweep 150 bench --backends torch --tokens 128,256,512,1024,2048,4096,8192,16384 --iters 20 --warmup 3 --name torch_sweep
      step bench_bf16_T4096 120 bench --backends torch,legacy,elastic --iters 30 --name bf16_T4096
      for run in a b; do
        step bench_small_T_$run 80 bench --backends legacy,elastic --tokens 128,256,512,1024 --iters 60 --rounds 6 --warmup 5 --name small_T_rounds_$run
      done
      ;;
    gap)  # issue 11: where the plugin's extra microseconds at 256 tokens go, one backend per process
      tree "$DEEPEP_DIR"; machine_info
      for run in legacy_1 elastic_1 legacy_2 elastic_2; do
        step small_t_gap_$run 75 env GAP_BACKENDS=${run%_*} GAP_OUT="$RES/small_t_gap_$run.json" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/small_t_gap.py
      done
      ;;
    torch_only)  # the torch backend alone: torch's own NCCL, no DeepEP (one command: install the wheels, run)
      export PYTHONPATH=$ROOT${PYTHONPATH:+:$PYTHONPATH}; machine_info
      step gpu_tests_torch 80 $PY -m pytest -v -rA tests/test_gpu.py tests/test_torch_backend.py::test_gpu_one_host_sync_per_dispatch_none_per_combine -k "torch or one_host_sync" --junitxml "$RES/gpu_tests_torch.xml"
      step bench_torch_T4096 60 bench --backends torch --tokens 4096 --iters 30 --name torch_T4096
      step bench_torch_T8192 60 bench --backends torch --tokens 8192 --iters 30 --name torch_T8192
      step bench_torch_sweep 150 bench --backends torch --tokens 128,256,512,1024,2048,4096,8192,16384 --iters 20 --warmup 3 --name torch_sweep
      step profile_torch 100 run2 benchmarks/profile_torch_backend.py --impl sum1=.payload_extra/sum1_torch_a2a.py --impl add=installed --tokens 256,4096 --backward --out "$RES/profile_torch_backend"
      step trace_torch 60 env TRACE_BACKEND=torch TRACE_T=4096 TRACE_ITERS=10 TRACE_OUT="$RES" $PY -m torch.distributed.run --standalone --nproc-per-node 2 benchmarks/gpu/trace_slot.py
      ;;
    *) echo "unknown stage $stage"; exit 2 ;;
  esac
done
archive
cat "$RES/steps.txt"
