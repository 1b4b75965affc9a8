#!/usr/bin/env bash
# Fill .whl/ with what the lent GPU machine lacks (../shared/GPU.md), so one device call can run
# benchmarks/gpu_bench.sh (which installs .whl/*.whl beside the machine's own torch):
#   bash benchmarks/gpu_wheels.sh            # -> .whl/ (git-ignored through info/exclude), its size printed
# Versions are the project venv's (pip list), so the device runs what was tested here. DeepSpeed has no
# wheel on the registry: one is built from the venv (no ops; they JIT-build there if ever needed).
# bitsandbytes (QLoRA) is the largest (~43 MB): SKIP_BNB=1 leaves it out when the 64 MiB carry limit is tight.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${SPARSEPO_PYTHON:-.venv/bin/python}
[ -x "$PY" ] || { echo "gpu_wheels: no interpreter at $PY (bash launcher/install.sh first, or set SPARSEPO_PYTHON)" >&2; exit 1; }
exclude=$(git rev-parse --git-path info/exclude)
mkdir -p "$(dirname "$exclude")"
grep -qx '/.whl/' "$exclude" 2>/dev/null || echo /.whl/ >> "$exclude"
mkdir -p .whl
pins=()
for pkg in datasets dill multiprocess pydantic pydantic-core annotated-types typing-inspection hjson fsspec \
           typing-extensions xxhash $([ "${SKIP_BNB:-0}" = 1 ] || echo bitsandbytes); do
  v=$("$PY" -m pip show "$pkg" 2>/dev/null | awk '/^Version:/{print $2}' || true)
  pins+=("$pkg${v:+==$v}")
done
trl=$("$PY" -m pip show trl 2>/dev/null | awk '/^Version:/{print $2}' || true)
pins+=("trl==${trl:-1.16.0}")
"$PY" -m pip download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_28_x86_64 --platform manylinux_2_24_x86_64 --platform manylinux_2_17_x86_64 \
  --platform manylinux2014_x86_64 -d .whl "${pins[@]}"
ds=$("$PY" -m pip show deepspeed | awk '/^Version:/{print $2}')
ls .whl/deepspeed-"$ds"-*.whl >/dev/null 2>&1 || \
  DS_BUILD_OPS=0 "$PY" -m pip wheel -q --no-deps --no-build-isolation "deepspeed==$ds" -w .whl
ls -1 .whl
du -sh .whl
