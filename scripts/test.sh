#!/usr/bin/env bash
# Install everything, then lint, type-check and run the full test suite. Fails loudly.
set -euo pipefail
cd "$(dirname "$0")/.."
bash scripts/install.sh
python3 -m ruff check .
python3 -m ruff format --check .
python3 -m mypy
# CIFAR-10 (JPEG copy) for tests/test_cifar10lt.py: extracted to a temporary directory, never
# into the repo; without the tar those tests skip with a message.
cifar_tar=../shared/data/cifar10-jpeg.tar.gz
if [ -z "${LTZOO_CIFAR10_JPEG:-}" ] && [ -f "$cifar_tar" ]; then
  cifar_dir="$(mktemp -d -t ltzoo-cifar10-jpeg-XXXXXX)"
  trap 'rm -rf "$cifar_dir"' EXIT
  tar xzf "$cifar_tar" -C "$cifar_dir"
  export LTZOO_CIFAR10_JPEG="$cifar_dir"
fi
set +e
python3 -m pytest -q -p no:cacheprovider "$@"
status=$?
set -e
if [ "$status" -eq 5 ]; then
  echo "pytest collected no tests: failing" >&2
  exit 1
fi
exit "$status"
