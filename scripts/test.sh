#!/usr/bin/env bash
# The test command: sets up the environment on a fresh machine (see setup_env.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k masks -x`.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m pytest "$@"
