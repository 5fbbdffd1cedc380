#!/usr/bin/env bash
# The GPU checks of issue #11 in one device call: what a device `run` executes from the repo root.
#
#   make gpu-kit                       # here, once: the wheels the device image lacks
#   device run, carry [".whl", ".whl-bnb", ".gpu-results"], timeout_s 600:
#     bash bench/gpu_session.sh [PART ...]
#
# PARTs, in the order run when none is named:
#   tests        pytest -m gpu: the train job on CUDA (none, nf4, int8), the eval job on CUDA
#   small        bench/estimator.py, full grid, sizes tiny and 0.5b (64 cells)
#   calibration  bench/calibration.py --device cuda (issue #5's GPU figure)
#   train        bench/train_vs_hf.py on CUDA: loraforge vs HF Trainer + PEFT, 0.5B then 1.5B
#   methods      bench/train_vs_hf.py --compare methods on CUDA (DoRA, nf4, BiDoRA costs)
#   1.5b         bench/estimator.py, full grid, size 1.5b (32 cells)
#   7b-r8        bench/estimator.py, full grid, size 7b, rank 8 (16 cells)
#   7b-r64       bench/estimator.py, full grid, size 7b, rank 64 (16 cells)
# The call stops starting work after GPU_SESSION_BUDGET seconds (default 520, inside the 600 s a
# device command may run): a part that would start later is listed at the end, to be named in
# the next call; an estimator part given less time than it needs leaves its remaining cells
# "not-run" (its JSON is written after every cell, so what it measured comes back). Copy the
# returned estimator-*.json into .gpu-results/ (git-ignored) and add it to the next call's carry:
# the estimator then keeps their finished cells and measures only the missing ones.
#
# Installs the carried wheels (.whl, .whl-bnb) into $SITE (default /tmp/site) as
# /work/.library/device/README.md shows, puts src/ and them on PYTHONPATH, prints versions and
# nvidia-smi, and fails with exit code 2 and a message when no CUDA GPU is visible. Everything
# printed goes to $OUT/session.log too; estimator results to $OUT/estimator-PART.json.
# Exit code: 0 when every part that ran passed, 1 when one failed, 2 when nothing could run.
# PYTHON (default python3, the image's) and SITE may be overridden to try it elsewhere.

set -uo pipefail
cd "$(dirname "$0")/.." || exit 2

if [[ -z ${OUT:-} ]]; then
    echo "FAILED: OUT is not set: run this through the device tool, or as OUT=DIR bash $0"
    exit 2
fi
PYTHON=${PYTHON:-python3}
SITE=${SITE:-/tmp/site}
BUDGET=${GPU_SESSION_BUDGET:-520}
ALL_PARTS=(tests small calibration train methods 1.5b 7b-r8 7b-r64)
MODELS=/tmp/loraforge-estimator-models  # random-init models, shared by the estimator parts
RESUME=${GPU_SESSION_RESUME:-.gpu-results}  # earlier calls' estimator-*.json, if carried

mkdir -p "$OUT" || exit 2
exec > >(tee -a "$OUT/session.log") 2>&1
TEE=$!
# on any exit: close the pipe to tee and wait, so that session.log is complete when we return
trap 'exec >&- 2>&-; wait "$TEE"' EXIT
export OUT PYTHON MODELS RESUME
export PYTHONUNBUFFERED=1 HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

die() {
    echo "FAILED: $*"
    exit 2
}

left() { echo $((BUDGET - SECONDS)); }

install_wheels() {
    local wheels=() dir
    for dir in .whl .whl-bnb; do
        if compgen -G "$dir/*.whl" >/dev/null; then
            wheels+=("$dir"/*.whl)
        else
            echo "note: no wheels in $dir (not carried?): the image's packages are used instead"
        fi
    done
    if ((${#wheels[@]})); then
        echo "installing ${#wheels[@]} carried wheels into $SITE"
        "$PYTHON" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
            --target "$SITE" "${wheels[@]}" || die "pip could not install the carried wheels"
    fi
    export PYTHONPATH="$PWD/src:$SITE${PYTHONPATH:+:$PYTHONPATH}"
}

versions() {
    "$PYTHON" - <<'EOF'
import importlib
import sys

print(f"python {sys.version.split()[0]} at {sys.executable}")
names = ["torch", "transformers", "peft", "accelerate", "safetensors", "tokenizers",
         "bitsandbytes", "pydantic", "pydantic_settings", "boto3", "botocore", "datasets",
         "numpy", "pyarrow", "pytest", "loraforge"]
for name in names:
    try:
        module = importlib.import_module(name)
    except Exception as exc:  # a missing package, or one that fails to load
        print(f"  {name:18} NOT IMPORTABLE ({type(exc).__name__}: {str(exc)[:160]})")
    else:
        print(f"  {name:18} {getattr(module, '__version__', '?'):22} {module.__file__}")
EOF
}

check_gpu() {
    if command -v nvidia-smi >/dev/null; then
        nvidia-smi || echo "note: nvidia-smi failed (rc $?)"
    else
        echo "note: nvidia-smi is not on the PATH"
    fi
    "$PYTHON" - <<'EOF' || die "the checks above failed: no part was run"
import sys

try:
    import torch

    import loraforge.edit, loraforge.eval, loraforge.train  # noqa: F401  (the jobs import)
except Exception as exc:
    sys.exit(f"cannot import torch or the loraforge jobs: {type(exc).__name__}: {exc}")
if not torch.cuda.is_available():
    sys.exit(f"no CUDA GPU is visible to torch {torch.__version__} "
             "(torch.cuda.is_available() is False): nothing was measured")
props = torch.cuda.get_device_properties(0)
print(f"CUDA ok: {props.name}, {props.total_memory / 2**30:.1f} GiB, torch {torch.__version__}, "
      f"CUDA {torch.version.cuda}, bf16 {torch.cuda.is_bf16_supported()}")
EOF
}

estimator() {  # time limit, part name, estimator arguments...
    local limit=$1 name=$2 resume=()
    shift 2
    if [[ -f $RESUME/estimator-$name.json ]]; then
        resume=(--resume "$RESUME/estimator-$name.json")
    fi
    "$PYTHON" bench/estimator.py --device cuda --grid full --steps 3 \
        --max-seconds $((limit - 60)) --models-dir "$MODELS" \
        --out "$OUT/estimator-$name.json" "${resume[@]}" "$@"
}

part() {  # time limit, part name
    local limit=$1 name=$2 tests
    case $name in
        tests)
            mapfile -t tests < <(grep -l "pytest.mark.gpu" tests/test_*.py)
            # only the modules with GPU tests: the others import launcher tools not carried
            "$PYTHON" -m pytest -p no:cacheprovider -m gpu -q "${tests[@]}"
            ;;
        small) estimator "$limit" "$name" --sizes tiny,0.5b ;;
        1.5b) estimator "$limit" "$name" --sizes 1.5b ;;
        7b-r8) estimator "$limit" "$name" --sizes 7b --ranks 8 ;;
        7b-r64) estimator "$limit" "$name" --sizes 7b --ranks 64 ;;
        calibration) "$PYTHON" bench/calibration.py --device cuda ;;
        train)
            for size in 0.5b 1.5b; do
                "$PYTHON" bench/train_vs_hf.py --device cuda --size "$size" --micro-batch-size 8 \
                    --grad-accum 4 --steps 20 --warmup 3 --threads 0 || return
            done
            ;;
        methods)
            "$PYTHON" bench/train_vs_hf.py --device cuda --size 0.5b --micro-batch-size 8 \
                --grad-accum 4 --steps 20 --warmup 3 --threads 0 --compare methods
            ;;
        *) return 3 ;;
    esac
}

main() {
    local parts=("$@") name rc limit ran=() failed=() later=()
    ((${#parts[@]})) || parts=("${ALL_PARTS[@]}")
    for name in "${parts[@]}"; do
        [[ " ${ALL_PARTS[*]} " == *" $name "* ]] || die "unknown part '$name': use ${ALL_PARTS[*]}"
    done
    echo "gpu_session: parts ${parts[*]}; budget ${BUDGET}s; $(date -u +%FT%TZ)"
    install_wheels
    versions
    check_gpu
    for name in "${parts[@]}"; do
        limit=$(left)
        if ((limit < 120)); then
            later+=("$name")
            continue
        fi
        echo "=== $name: started at ${SECONDS}s, ${limit}s left"
        timeout --kill-after=15 "$limit" bash -c "$(declare -f part estimator); part $limit $name"
        rc=$?
        ran+=("$name rc=$rc")
        ((rc == 0)) || failed+=("$name")
        ((rc == 124)) && echo "=== $name: stopped at the budget (${limit}s)"
    done
    echo "=== done in ${SECONDS}s: ${ran[*]:-nothing ran}"
    ls -l "$OUT"
    ((${#ran[@]})) || failed+=("(none ran: GPU_SESSION_BUDGET=$BUDGET is too small)")
    if ((${#later[@]})); then
        echo "not started (budget): ${later[*]}; run them next: bash bench/gpu_session.sh ${later[*]}"
    fi
    if ((${#failed[@]})); then
        echo "FAILED parts: ${failed[*]}"
        return 1
    fi
}

main "$@"
