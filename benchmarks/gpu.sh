#!/usr/bin/env bash
# `bench_gpu` on a lent GPU machine (its own python3, jax with CUDA, no network):
# installs the pure-Python wheels carried in .whl/ (this project's versions of equinox,
# diffrax, optimistix, lineax, jaxtyping, wadler_lindig), prints the card, then runs the
# benchmark with its output and results under $OUT (default /tmp/bench_gpu).
#
#   python -m benchmarks.bench_gpu --make-refs     # here, first: .gpu/refs.npz
#   bash benchmarks/gpu.sh [bench_gpu options]    # there, carrying .whl and .gpu
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/bench_gpu}
mkdir -p "$OUT"
if compgen -G ".whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/site .whl/*.whl || exit 1
  export PYTHONPATH=/tmp/site
fi
export PYTHONPATH="${PYTHONPATH:+$PYTHONPATH:}$PWD" PYTHONUNBUFFERED=1
nvidia-smi --query-gpu=name,driver_version,memory.total,clocks.sm,clocks.mem --format=csv || true
python3 -c "import jax, diffrax, equinox, optimistix, lineax; print('jax', jax.__version__, jax.devices(), 'diffrax', diffrax.__version__, 'equinox', equinox.__version__)"
python3 -m benchmarks.bench_gpu --out "$OUT" --deadline 420 "$@" 2>&1 | tee "$OUT/log.txt"
