#!/usr/bin/env bash
# Creates .venv (once) with scaletrain and its dependencies, then exits. EXTRAS names optional extras
# to add (`make test` asks for "dev", which pulls every optional feature the tests exercise).
#
# torch: if the interpreter already has torch (a CUDA build, say) it is kept. Otherwise, on a machine
# without an NVIDIA driver we install a pinned CPU-friendly release; with `nvidia-smi` present we let
# pip pick the default (CUDA) build. Override with TORCH_SPEC, e.g. TORCH_SPEC="torch==2.6.0".
# deepspeed is installed without build isolation: its setup.py imports torch, and an isolated build
# would download a second, multi-GB torch into the build environment.
set -euo pipefail
cd "$(dirname "$0")/.."
VENV=${VENV:-.venv}
PY=${PYTHON:-python3}
EXTRAS=${EXTRAS:-}
STAMP="$VENV/.scaletrain-installed${EXTRAS:+-${EXTRAS//,/-}}"

if [[ -f "$STAMP" && "$STAMP" -nt pyproject.toml ]]; then
  exit 0
fi
[[ -x "$VENV/bin/python" ]] || "$PY" -m venv "$VENV"
pip=("$VENV/bin/python" -m pip install --disable-pip-version-check -q)

if ! "$VENV/bin/python" -c 'import torch' 2>/dev/null; then
  if [[ -n "${TORCH_SPEC:-}" ]]; then
    spec=$TORCH_SPEC
  elif command -v nvidia-smi >/dev/null 2>&1; then
    spec="torch>=2.6"
  else
    spec="torch==2.13.0"
  fi
  echo "setup: installing $spec"
  "${pip[@]}" "$spec"
fi
"${pip[@]}" wheel setuptools ninja packaging psutil py-cpuinfo hjson msgpack pydantic numpy
"$VENV/bin/python" -c 'import deepspeed' 2>/dev/null || "${pip[@]}" --no-build-isolation "deepspeed>=0.16"
"${pip[@]}" -e ".${EXTRAS:+[$EXTRAS]}"
touch "$STAMP"
echo "setup: ready ($VENV)"
