#!/usr/bin/env bash
# Fetch the pure-Python wheels the GPU machine lacks (it reaches no registry) into .whl/
set -euo pipefail
cd "$(dirname "$0")/.."
grep -qx '/.whl/' .git/info/exclude 2>/dev/null || echo '/.whl/' >> .git/info/exclude
python3 -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux2014_x86_64 -d .whl \
  liger-kernel pytest-benchmark py-cpuinfo hypothesis sortedcontainers
ls -la .whl
