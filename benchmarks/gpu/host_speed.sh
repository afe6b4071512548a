#!/usr/bin/env bash
# Is a slow host-bound process on the 2 x H200 VM a slow core or a slow moment? Runs ON the GPU machine.
#   bash benchmarks/gpu/host_speed.sh cores            pure-Python speed (us per sum(range(200))) of every vCPU, twice
#   bash benchmarks/gpu/host_speed.sh pinned A B ARGS  ep_bench with rank 0 on cores A, rank 1 on cores B (taskset lists)
set -u
case "${1:-}" in
  cores)
    for pass in 1 2; do
      echo -n "pass $pass:"
      for c in $(seq 0 $(( $(nproc) - 1 ))); do
        echo -n " $c=$(taskset -c "$c" python3 -c "import timeit; print(round(min(timeit.repeat('sum(range(200))', number=2000, repeat=5)) / 2000 * 1e6, 2))")"
      done
      echo
    done ;;
  pinned)
    a=$2; b=$3; shift 3
    PIN_0=$a PIN_1=$b python3 -m torch.distributed.run --standalone --nproc-per-node 2 --no-python \
      bash -c 'exec taskset -c "$(printenv PIN_$LOCAL_RANK)" python3 "$@"' pin benchmarks/ep_bench.py "$@" ;;
  *) sed -n 2,5p "$0" ;;
esac
