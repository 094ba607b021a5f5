#!/bin/sh
# What libFuzzer runs when it starts the harness again (-merge=1, -fork=N):
# the same python and environment as fuzz/run.sh set up.
exec "${PYTHON:-.venv/bin/python}" "$(dirname "$0")/fuzz_binding.py" "$@"
