#!/usr/bin/env bash
# Prove with pip's own resolver that requirements.txt installs over an image's torch without
# replacing it: for each torch version below, resolve `-r requirements.txt torch==X` as a
# fresh environment would (--ignore-installed) without installing anything (--dry-run).
#
#   scripts/check_requirements.sh [TORCH_VERSION ...]    (default: 2.5.1 2.6.0 2.7.1 2.8.0 2.9.1 2.13.0)
#
# Each version is resolved twice: as pip picks freely, and with transformers held at 5.25 or
# newer, the first release that requires Hugging Face's `kernels` (imported as a package named
# `kernels`; Baton's own kernels/ folder is imported as `baton.kernels`, DESIGN.md "Import
# names"). A resolution with transformers >= 5.25 must bring `kernels` along, or it fails here.
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
resolve() {  # $1: torch version, $2: a label, $3...: extra requirements
  local version=$1 label=$2; shift 2
  report="$REPORT_DIR/torch-$version$label.json"
  log="$REPORT_DIR/torch-$version$label.log"
  start=$(date +%s)
  if "$PY" -m pip install --dry-run --ignore-installed --quiet --report "$report" \
      -r requirements.txt "torch==$version" "$@" >"$log" 2>&1; then
    summary=$("$PY" - "$report" <<'PY'
import json, sys
picked = {i["metadata"]["name"].lower(): i["metadata"]["version"]
          for i in json.load(open(sys.argv[1]))["install"]}
print(" ".join(f"{n}={picked[n]}" for n in
               ("torch", "triton", "transformers", "kernels", "peft", "bitsandbytes",
                "accelerate") if n in picked))
major, minor = (int(x) for x in picked["transformers"].split(".")[:2])
if (major, minor) >= (5, 25) and "kernels" not in picked:
    sys.exit(f"transformers {picked['transformers']} resolved without HF's kernels")
PY
)
    local ok=$?
  else
    local ok=1 summary=$(grep -E "ERROR|conflict|requires" "$log" | head -20 | sed 's/^/      /')
  fi
  if [ "$ok" = 0 ]; then
    echo "ok    torch==$version$label ($(( $(date +%s) - start )) s): $summary"
  else
    failed=1
    echo "FAIL  torch==$version$label ($(( $(date +%s) - start )) s):"
    echo "$summary"
  fi
}

for version in "${VERSIONS[@]}"; do
  resolve "$version" ""
  resolve "$version" " transformers>=5.25" "transformers>=5.25"
done
echo "reports: $REPORT_DIR"
exit $failed
