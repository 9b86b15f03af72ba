#!/usr/bin/env bash
# The GPU checks in one prepared run, for a session that is lent a CUDA machine.
#
#   benchmarks/gpu_check.sh prepare      # here: copies mnist1d into .gpu/ (ignored;
#                                        # from .venv/bin/python, or PY if set)
#   benchmarks/gpu_check.sh run [OUT]    # there: carry .gpu; at most 9.5 minutes
#
# The machine's own python3 (with a CUDA build of torch, numpy, scipy, pytest,
# scikit-learn, tqdm) runs the package from src/; mnist1d is the one dependency
# it lacks, so `prepare` copies it from this checkout's virtual environment. Each
# step has its own time limit and appends its log to one of four logs in OUT (at
# most 8 files come back: 4 logs, 3 JSON results and summary.txt); a failing step
# does not stop the others. The limits add up to 570 s with each step's 5 s kill
# grace, inside one 600 s device command; the last step takes what is left. The
# steps:
#   1. tests/test_cuda.py and the CUDA cases of the training tests (CUDA vs CPU
#      in float64, the CUDA RNG, autocast, fit on CUDA);
#   2. benchmarks/bench_measure.py --device cuda --quick;
#   3. benchmarks/bench_regularizers.py --device cuda --quick;
#   4. resnet-double-descent at --preset smoke on a generated CIFAR-10 folder
#      (skipped without matplotlib, which draws its figures);
#   5. examples/ddp.py under torchrun with NCCL on one GPU;
#   6. benchmarks/paper_scale.py: the hours one paper-preset run takes;
#   7. the whole test suite under the machine's own torch (pytest-xdist), with
#      CUDA visible, in the time left.
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
END=570  # seconds into the run by which every step has ended

step() {  # step NAME LOG SECONDS COMMAND...: run with a time limit, log, summarise
    local name=$1 log=$2 limit=$3
    shift 3
    local left=$((END - 5 - SECONDS))
    if [ "$limit" -gt "$left" ]; then limit=$left; fi
    if [ "$limit" -lt 10 ]; then
        echo "$name: skipped, no time left" | tee -a "$summary"
        return
    fi
    local start=$SECONDS
    echo "===== $name (limit $limit s)" >> "$OUT/$log.log"
    # -k: a step that ignores SIGTERM (a hung NCCL worker under torchrun) is
    # killed 5 s later, so the steps stay inside one 600 s device command
    timeout -k 5 "$limit" "$@" >> "$OUT/$log.log" 2>&1
    local rc=$?
    echo "$name: exit $rc in $((SECONDS - start)) s (limit $limit)" | tee -a "$summary"
    tail -n 12 "$OUT/$log.log"
}

# the set-up too under time limits: a hung CUDA initialisation would take the
# whole device command's 600 s, and every step's log with it
{ timeout -k 5 60 $PY -c 'import torch; print("torch", torch.__version__, "cuda",
    torch.version.cuda,
    torch.cuda.get_device_name(0) if torch.cuda.is_available() else "NO CUDA")'
  nproc; timeout -k 5 20 nvidia-smi -L; } 2>&1 | tee -a "$summary"
# without mnist1d, bench_measure skips its MNIST-1D stage: say so, and why, at
# the top of the summary (mnist1d imports requests and matplotlib.pyplot, which
# prepare does not copy: a machine without them fails with .gpu carried)
if ! err=$(timeout -k 5 60 $PY -c 'import mnist1d' 2>&1); then
    echo "WARNING: mnist1d does not import ($(echo "$err" | tail -n 1)):" \
        "run '$0 prepare' and carry .gpu, or install what it names" \
        | tee -a "$summary"
fi

step tests tests 120 $PY -m pytest -q -p no:cacheprovider tests/test_cuda.py \
    tests/test_training.py -k "cuda"
step bench_measure bench 110 $PY benchmarks/bench_measure.py --device cuda --quick \
    --threads 8 --out "$OUT/measure_cuda.json"
step bench_regularizers bench 110 $PY benchmarks/bench_regularizers.py --device cuda \
    --quick --threads 8 --out "$OUT/regularizers_cuda.json"

cifar=$(mktemp -d)/cifar-10-batches-py
timeout -k 5 60 $PY -c "import sys; sys.path.insert(0, 'tests')
from pathlib import Path; from conftest import write_fake_cifar
write_fake_cifar(Path('$cifar'), n=64)"
# the experiment ends with its figures: without matplotlib (not promised there)
# the CLI refuses at once, which the summary would show as a failing step
if $PY -c 'import matplotlib' > /dev/null 2>&1; then
    step resnet_smoke experiments 50 $PY -m geocomplexity.cli reproduce \
        resnet-double-descent --preset smoke --device cuda --workers 1 \
        --data-dir "$cifar" --out "$(mktemp -d)"
else
    echo "resnet_smoke: skipped, matplotlib does not import (the experiment" \
        "draws its figures)" | tee -a "$summary"
fi
step ddp experiments 40 $PY -m torch.distributed.run --standalone \
    --nproc_per_node 1 examples/ddp.py
step paper_scale experiments 60 $PY benchmarks/paper_scale.py --device cuda \
    --widths 1,8,64 --n 10000 --out "$OUT/paper_scale_cuda.json"
# the CUDA-only file ran above; the rest under this torch, with CUDA visible
# (fit's device="auto" picks it), on the machine's cores
# one thread per worker (15 workers of 16 threads each oversubscribed the cores:
# half the suite in 280 s, against all of it in 82 s); pytest-benchmark, on that
# machine, refuses to run beside xdist; -v names each test as it ends, so a
# step cut off by its limit still says which failed; the doctests import every
# module of src/, and one whose optional dependency is missing there
# (integrations/lightning.py without Lightning) stopped the whole step at
# collection: it is logged as a collection error and the rest runs
step suite suite 600 env OMP_NUM_THREADS=1 MKL_NUM_THREADS=1 $PY -m pytest -v \
    --tb=short -rfE -p no:cacheprovider -p no:benchmark -n 15 \
    --continue-on-collection-errors \
    --ignore tests/test_cuda.py tests src README.md

cat "$summary"
