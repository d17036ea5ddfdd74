#!/usr/bin/env bash
# Set up (once) and run the test suite on the CPU.
#   scripts/test.sh          the quick set: every test but those marked `slow` (≤ 10 min on 2 idle cores)
#   scripts/test.sh --all    every test, as CI runs it (.ci/run); RADIO_TEST_ALL=1 does the same
# Other arguments go to pytest (a later `-m EXPR` replaces the quick set's `-m "not slow"`).
set -euo pipefail
cd "$(dirname "$0")/.."
select=(-m "not slow")
if [ "${1:-}" = "--all" ]; then
    shift
    select=()
elif [ -n "${RADIO_TEST_ALL:-}" ]; then
    select=()
fi
scripts/setup.sh
.venv/bin/python -m pytest -q "${select[@]}" "$@"
