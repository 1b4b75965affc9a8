# Sourced by gpu_bench.sh and gpu_session.sh (with PY set): the wheels carried to a machine without network
# (../shared/GPU.md, benchmarks/gpu_wheels.sh), installed into a temporary directory beside, never over, its
# torch, and put on PYTHONPATH; nothing when .whl/ is empty or the machine already has deepspeed and datasets.
if compgen -G ".whl/*.whl" >/dev/null && ! "$PY" -c "import deepspeed, datasets" 2>/dev/null; then
  SITE=$(mktemp -d)
  "$PY" -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --target "$SITE" .whl/*.whl
  export PYTHONPATH="$SITE:$PYTHONPATH"
fi
