#!/usr/bin/env bash
# The test command: sets up the environment on a fresh machine (see setup_env.sh), then runs pytest.
# Extra arguments go to pytest, e.g. `bash scripts/test.sh -k masks -x`.
# Test files run in parallel, one per CPU core (pytest-xdist; a file stays on one worker, so its module fixtures
# are built once); FASTJEPA_TEST_WORKERS=0 runs them in this one process.
set -euo pipefail
source "$(dirname "${BASH_SOURCE[0]}")/setup_env.sh"
exec python -m pytest -n "${FASTJEPA_TEST_WORKERS:-auto}" --dist loadfile "$@"
