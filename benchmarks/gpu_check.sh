#!/usr/bin/env bash
# The GPU checks in one prepared run, for a session that is lent a CUDA machine.
#
#   benchmarks/gpu_check.sh prepare      # here: copies mnist1d into .gpu/ (ignored;
#                                        # from .venv/bin/python, or PY if set)
#   benchmarks/gpu_check.sh run [OUT]    # there: carry .gpu; about 6-9 minutes
#
# The machine's own python3 (with a CUDA build of torch, numpy, scipy, pytest,
# scikit-learn, tqdm) runs the package from src/; mnist1d is the one dependency
# it lacks, so `prepare` copies it from this checkout's virtual environment. Each
# step has its own time limit and writes its log to OUT (at most 8 files come
# back: 5 logs, 2 JSON results and summary.txt); a failing step does not stop
# the others. The limits add up to 550 s (575 s with each step's 5 s kill
# grace), inside one 600 s device command. The steps:
#   1. tests/test_cuda.py and the CUDA cases of the training tests (CUDA vs CPU
#      in float64, the CUDA RNG, autocast, fit on CUDA);
#   2. benchmarks/bench_measure.py --device cuda --quick;
#   3. benchmarks/bench_regularizers.py --device cuda --quick;
#   4. resnet-double-descent at --preset smoke on a generated CIFAR-10 folder;
#   5. examples/ddp.py under torchrun with NCCL on one GPU.
set -u -o pipefail
cd "$(dirname "$0")/.."

if [ "${1:-}" = prepare ]; then
    # every failure here is fatal: a .gpu/ without mnist1d reported as prepared
    # surfaced only on the GPU, after bench_measure had timed every model
    py=${PY:-.venv/bin/python}
    if ! site=$("$py" -c 'import mnist1d, os; print(os.path.dirname(os.path.dirname(mnist1d.__file__)))'); then
        echo "$0 prepare: $py cannot import mnist1d; run it where the virtual" \
            "environment is (.venv with the test extras), or set PY" >&2
        exit 1
    fi
    mkdir -p .gpu/site
    rm -rf .gpu/site/mnist1d
    cp -r "$site/mnist1d" .gpu/site/ || exit 1
    echo "prepared .gpu/site/mnist1d: name .gpu in the device run's carry"
    exit 0
fi
if [ "${1:-}" != run ]; then
    echo "usage: $0 prepare | run [OUT]" >&2
    exit 2
fi

OUT=${2:-${OUT:-/tmp/gpu_check}}
mkdir -p "$OUT"
PY=${PY:-python3}
export PYTHONPATH="$PWD/src:$PWD/.gpu/site${PYTHONPATH:+:$PYTHONPATH}"
export PYTHONUNBUFFERED=1
summary="$OUT/summary.txt"
: > "$summary"

step() {  # step NAME SECONDS COMMAND...: run with a time limit, log, summarise
    local name=$1 limit=$2
    shift 2
    local start=$SECONDS
    # -k: a step that ignores SIGTERM (a hung NCCL worker under torchrun) is
    # killed 5 s later, so the steps stay inside one 600 s device command
    timeout -k 5 "$limit" "$@" > "$OUT/$name.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s" | tee -a "$summary"
    tail -n 15 "$OUT/$name.log"
}

$PY -c 'import torch; print("torch", torch.__version__, "cuda", torch.version.cuda,
         torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")' \
    | tee -a "$summary"
# without mnist1d, bench_measure times every model and then dies at its MNIST-1D
# stage without writing its JSON: say so at the top of the summary
$PY -c 'import mnist1d' > /dev/null 2>&1 \
    || echo "WARNING: mnist1d does not import: run '$0 prepare' and carry .gpu" \
    | tee -a "$summary"

step tests 150 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_training.py -k "cuda"
step bench_measure 120 $PY benchmarks/bench_measure.py --device cuda --quick \
    --threads 8 --out "$OUT/measure_cuda.json"
step bench_regularizers 130 $PY benchmarks/bench_regularizers.py --device cuda \
    --quick --threads 8 --out "$OUT/regularizers_cuda.json"

cifar=$(mktemp -d)/cifar-10-batches-py
$PY -c "import sys; sys.path.insert(0, 'tests')
from pathlib import Path; from conftest import write_fake_cifar
write_fake_cifar(Path('$cifar'), n=64)"
step resnet_smoke 90 $PY -m geocomplexity.cli reproduce resnet-double-descent \
    --preset smoke --device cuda --workers 1 --data-dir "$cifar" --out "$(mktemp -d)"
step ddp 60 $PY -m torch.distributed.run --standalone --nproc_per_node 1 \
    examples/ddp.py

cat "$summary"
