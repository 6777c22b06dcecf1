#!/usr/bin/env bash
# The one prepared GPU check (benchmarks/device_check.py): ends by itself in < 8 minutes.
#   bash scripts/device_check.sh          on the lent GPU machine (files go to $OUT)
#   bash scripts/device_check.sh --plan   on CPU: every part for a few steps + the time plan
# Before the device call, run `bash scripts/device_prepare.sh` here: it puts the data and the
# wheels the GPU machine lacks into .device/ (carry it: carry=[".device"]).
set -uo pipefail
cd "$(dirname "$0")/.."
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
if [ "${1:-}" != "--plan" ] && compgen -G ".device/whl/*.whl" >/dev/null; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
    --target /tmp/ltzoo-site .device/whl/*.whl || echo "device_check: wheel install failed" >&2
  export PYTHONPATH="$PWD:/tmp/ltzoo-site"
fi
out="${OUT:-runs/device_check}"
mkdir -p "$out"
python3 benchmarks/device_check.py --out "$out" "$@" 2>&1 | tee "$out/device_check.log"
