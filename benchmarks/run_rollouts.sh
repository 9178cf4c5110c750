#!/usr/bin/env bash
# One device run of benchmarks/rollouts.py (carry .whl-fast/); arguments go to the script.
exec bash "$(dirname "$0")/run_installed.sh" benchmarks/rollouts.py "$@"
