#!/usr/bin/env bash
# Prove with pip's own resolver that requirements.txt installs over an image's torch without
# replacing it: for each torch version below, resolve `-r requirements.txt torch==X` as a
# fresh environment would (--ignore-installed) without installing anything (--dry-run).
#
#   scripts/check_requirements.sh [TORCH_VERSION ...]    (default: 2.5.1 2.6.0 2.7.1 2.8.0 2.9.1 2.13.0)
#
# Needs network access to PyPI; not part of `make test`. Run it when requirements.txt
# changes. PyPI serves each wheel's metadata on its own (PEP 658), so pip resolves without
# downloading the multi-GB CUDA wheels. Machine-wide pip settings (extra indexes, local wheel
# folders, constraint files) are ignored: the question is what a user's pip does.
# Exit status: 0 when every version resolves, 1 otherwise. Each version's pip report is kept
# in $REPORT_DIR (default: a temporary folder) as torch-X.json.
set -u
cd "$(dirname "$0")/.."
PY=${PY:-.venv/bin/python}
[ -x "$PY" ] || PY=python3
VERSIONS=("$@")
[ ${#VERSIONS[@]} -gt 0 ] || VERSIONS=(2.5.1 2.6.0 2.7.1 2.8.0 2.9.1 2.13.0)
REPORT_DIR=${REPORT_DIR:-$(mktemp -d)}
mkdir -p "$REPORT_DIR"
export PIP_CONFIG_FILE=/dev/null PIP_DISABLE_PIP_VERSION_CHECK=1
unset PIP_FIND_LINKS PIP_EXTRA_INDEX_URL PIP_INDEX_URL PIP_CONSTRAINT PIP_REQUIREMENT

echo "pip: $("$PY" -m pip --version)"
failed=0
for version in "${VERSIONS[@]}"; do
  report="$REPORT_DIR/torch-$version.json"
  log="$REPORT_DIR/torch-$version.log"
  start=$(date +%s)
  if "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" \
      -r requirements.txt "torch==$version" >"$log" 2>&1; then
    summary=$("$PY" - "$report" <<'PY'
import json, sys
picked = {i["metadata"]["name"].lower(): i["metadata"]["version"]
          for i in json.load(open(sys.argv[1]))["install"]}
print(" ".join(f"{n}={picked[n]}" for n in
               ("torch", "triton", "transformers", "peft", "bitsandbytes", "accelerate")
               if n in picked))
PY
)
    echo "ok    torch==$version ($(( $(date +%s) - start )) s): $summary"
  else
    failed=1
    echo "FAIL  torch==$version ($(( $(date +%s) - start )) s):"
    grep -E "ERROR|conflict|requires" "$log" | head -20 | sed 's/^/      /'
  fi
done
echo "reports: $REPORT_DIR"
exit $failed
