#!/usr/bin/env bash
# The main job: pretrain a tiny ViT with I-JEPA on the bundled MNIST digits, then linear-probe it against a
# random-init encoder and raw pixels (python -m fastjepa.demo). Sets up the environment first (setup_env.sh).
# Extra arguments are config overrides, e.g. `bash scripts/demo.sh optimization.epochs=2`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m fastjepa.demo "$@"
