#!/usr/bin/env bash
# Create .venv and install fasttrain with every extra (ffcv, dali, dev).
# ffcv builds against Debian's libturbojpeg and OpenCV: installed here when run as root.
set -euo pipefail
cd "$(dirname "$0")/.."
APT_PKGS="pkg-config libturbojpeg0-dev libopencv-dev"

missing=()
for p in $APT_PKGS; do
  dpkg-query -W -f='${Status}' "$p" 2>/dev/null | grep -q "install ok installed" || missing+=("$p")
done
if [ ${#missing[@]} -gt 0 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "[setup] installing Debian packages: ${missing[*]}"
    export DEBIAN_FRONTEND=noninteractive
    apt-get update -qq
    apt-get install -y -qq --no-install-recommends $APT_PKGS
  else
    echo "[setup] ffcv needs Debian packages that are missing: ${missing[*]}" >&2
    echo "[setup] run as root:  apt-get install -y --no-install-recommends $APT_PKGS" >&2
    echo "[setup] then run 'make setup' again." >&2
    exit 1
  fi
fi

PYTHON=${PYTHON:-python3}
[ -x .venv/bin/python ] || "$PYTHON" -m venv .venv
.venv/bin/python -m pip install -q --upgrade pip setuptools wheel
# torch/torchvision pinned in setup.py; they install from local disk.
# ffcv's setup.py imports numpy and pkgconfig at build time: give it the venv's (no isolation).
.venv/bin/python -m pip install -q "torch==2.14.1" "torchvision==0.29.1" numpy pkgconfig cython
.venv/bin/python -m pip install -q --no-build-isolation -e ".[ffcv,dali,dev]"
.venv/bin/python -c "import fasttrain, fasttrain.converters, fasttrain.kernels; print('[setup] fasttrain', fasttrain.__version__, 'ready')"
