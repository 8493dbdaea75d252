#!/usr/bin/env bash
# One command to set up and run: ./run.sh report | ./run.sh test (| ./run.sh demo)
# Creates .venv with the project installed, then runs the job. Needs only Python >= 3.10 and pip.
set -euo pipefail
cd "$(dirname "$0")"

VENV="${NORMLAB_VENV:-.venv}"
PYTHON="${PYTHON:-python3}"

setup() {  # $1: the optional-dependency group to install ("" for none)
  [ -x "$VENV/bin/python" ] || "$PYTHON" -m venv "$VENV"
  local pip=("$VENV/bin/python" -m pip --quiet --disable-pip-version-check)
  if ! "$VENV/bin/python" -c "import torch" 2>/dev/null; then
    # A CPU-only torch wheel from the machine's local wheel directory (pip's find-links),
    # when there is one, avoids several GB of CUDA packages; otherwise the registry's torch.
    "${pip[@]}" install --no-index --no-deps "torch>=2.4" 2>/dev/null || true
  fi
  "${pip[@]}" install -e ".${1:+[$1]}"
}

case "${1:-}" in
  report)
    setup lab
    "$VENV/bin/normlab" report "${@:2}"
    ;;
  demo)
    setup ""
    "$VENV/bin/normlab" demo
    ;;
  test)
    setup test
    "$VENV/bin/ruff" check src tests examples scripts
    "$VENV/bin/python" -m pytest "${@:2}"
    ;;
  *)
    echo "usage: ./run.sh report [normlab report args] | ./run.sh test [pytest args]" \
      "| ./run.sh demo" >&2
    exit 2
    ;;
esac
