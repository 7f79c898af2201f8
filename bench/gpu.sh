#!/usr/bin/env bash
# The GPU suite (bench/gpu_suite.py) in one command: every part, one JSON line as the last line of stdout.
# On one H200 it is sized to finish within 8 minutes (a hard 470-second limit here); --dry-run runs the same
# parts end to end at tiny shapes on any backend, CPU included.
#   bash bench/gpu.sh [--dry-run] [other bench/gpu_suite.py arguments]
# Exit status: the suite's (0: every part ran; 1: a part failed, named in the JSON's "errors"; 124: over time).
set -euo pipefail
cd "$(dirname "$0")/.."
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}" PYTHONUNBUFFERED=1
# A GPU run lets XLA take the memory it needs; no preallocation of 75 %, so that torch's part fits beside it.
export XLA_PYTHON_CLIENT_PREALLOCATE=false
exec timeout "${GPU_SUITE_TIMEOUT:-470}" python bench/gpu_suite.py "$@"
