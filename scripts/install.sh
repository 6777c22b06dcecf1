#!/usr/bin/env bash
# Install everything ltzoo needs on a fresh Debian machine with Python 3.11 (no GPU needed).
set -euo pipefail
cd "$(dirname "$0")/.."
if ! [ -d /usr/share/datasets/fashion-mnist ]; then
  SUDO=""; [ "$(id -u)" -ne 0 ] && SUDO="sudo"
  $SUDO apt-get update
  $SUDO apt-get install -y dataset-fashion-mnist
fi
python3 -m pip install --quiet torch==2.14.1 torchvision==0.29.1
python3 -m pip install --quiet -e ".[all]"
