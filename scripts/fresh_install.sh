#!/usr/bin/env bash
# What a new user gets today: a fresh venv from requirements.txt with the newest releases its
# ranges allow, then the tiny end to end through the real CLI (scripts/demo.py --tiny: session 1
# cut by SIGTERM -> exit 75, session 2 resumes -> exit 0, status, merge), once with Hugging
# Face's `kernels` (a hard dependency of transformers >= 5.25) and once with it uninstalled.
# Then the GPU check's image-shaped dry run with the newest transformers, peft and accelerate.
#
#   scripts/fresh_install.sh            (make fresh-check; .ci/run runs it after make test)
#
# Needs PyPI. torch is installed first, alone, as the CPU build of the pin (2.13.0): on Kaggle
# and Colab torch comes with the image, and requirements.txt is written to leave it in place.
# Everything else is resolved from requirements.txt alone. The resolved versions are printed
# first, so that a failure says which release moved.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PY:-python3}
WORK=${FRESH_DIR:-.cache/fresh-install}
VENV="$WORK/venv"
TORCH=$(sed -n 's/^torch==//p' requirements-dev.txt)
export PIP_DISABLE_PIP_VERSION_CHECK=1

started=$(date +%s)
if [ "${FRESH_KEEP_VENV:-0}" = 1 ] && [ -x "$VENV/bin/python" ]; then
    # For re-running the checks after a code change: the same venv, its kernels put back.
    echo "fresh-install: reusing $VENV (FRESH_KEEP_VENV=1); CI always builds a new one"
    find "$WORK" -mindepth 1 -maxdepth 1 ! -name venv -exec rm -rf {} +
else
    rm -rf "$WORK"
    mkdir -p "$WORK"
    echo "fresh-install: a new venv in $VENV, torch==$TORCH (CPU) first, then requirements.txt"
    "$PY" -m venv "$VENV"
    "$VENV/bin/pip" install -q --upgrade pip
    "$VENV/bin/pip" install -q "torch==$TORCH"
fi
"$VENV/bin/pip" install -q --upgrade --upgrade-strategy eager -r requirements.txt
echo "fresh-install: resolved in $(( $(date +%s) - started )) s:"
"$VENV/bin/python" - <<'PY'
import importlib.metadata as m
names = ("torch triton transformers kernels peft accelerate bitsandbytes huggingface_hub "
         "tokenizers safetensors pydantic tenacity boto3 rich kaggle").split()
for name in names:
    try:
        version = m.version(name)
    except m.PackageNotFoundError:
        version = "(not installed)"
    print(f"  {name:16} {version}")
PY

end_to_end() {  # $1: a label
    local out="$WORK/demo-$1"
    echo "fresh-install: [$1] import transformers.integrations.hub_kernels, from the repository root"
    "$VENV/bin/python" -c "import sys; sys.path.insert(0, '.'); \
import transformers.integrations.hub_kernels, baton.kernels.rmsnorm; \
import importlib.util as u; s = u.find_spec('kernels'); \
print('  kernels ->', s.origin if s and s.origin else 'not installed')"
    echo "fresh-install: [$1] two sessions (SIGTERM, resume), status and merge"
    local t0=$(date +%s)
    "$VENV/bin/python" scripts/demo.py --tiny --steps 30 --samples 60 --session-limit 90s \
        --out "$out" > "$WORK/demo-$1.log" 2>&1 || {
        tail -40 "$WORK/demo-$1.log"; echo "fresh-install: [$1] FAILED (log: $WORK/demo-$1.log)"
        exit 1; }
    grep -E "^session 1 paused|^merged model" "$WORK/demo-$1.log" | sed 's/^/  /'
    echo "fresh-install: [$1] passed in $(( $(date +%s) - t0 )) s"
}

end_to_end with-kernels
"$VENV/bin/pip" uninstall -q -y kernels
end_to_end without-kernels

echo "fresh-install: the GPU check's dry run in an image-shaped venv, newest transformers/peft/accelerate"
# Its own --basetemp: pytest prunes all but the newest three numbered temp folders, which
# would pull the files from under a test run going on beside this one.
BATON_IMAGE_NEWEST=1 "${TEST_PY:-.venv/bin/python}" -m pytest -q -p no:cacheprovider \
    --basetemp "$WORK/pytest" tests/test_gpu_check.py -k "dry_run and newest"
echo "fresh-install: all passed in $(( $(date +%s) - started )) s"
