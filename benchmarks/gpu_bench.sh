#!/usr/bin/env bash
# GPU benchmark: the demo, then a ~0.5B-parameter Llama (built from config) trained with ZeRO-3 over
# NCCL in bf16, reference from the cache and from a live 2-stage pipeline reference group.
# Never run in CI; needs a CUDA machine with >= 3 GPUs for the live run (1+ policy, 2 reference).
#
#   benchmarks/gpu_bench.sh                       # all GPUs, 300 steps
#   NGPU=4 STEPS=200 MICRO=8 OUT=runs/gpu-bench benchmarks/gpu_bench.sh
#
# Prints, per run: median policy step time, tokens/s (sparsepo's train/tokens_per_s, all policy
# ranks), peak CUDA memory per role (max_memory_allocated of each process, via
# benchmarks/gpu_entry.py), and the overlap ratio = live step time / cache step time (as in
# benchmarks/bench_overlap.py: 1.00 means the reference group costs the policy nothing).
# A summary is written to $OUT/summary.json.
#
# Environment: SPARSEPO_PYTHON (default .venv/bin/python), NGPU (default: all), STEPS (300),
# MICRO (micro-batch per policy rank, 8), OUT (runs/gpu-bench), TORCH_INDEX (the CUDA wheel index,
# default https://download.pytorch.org/whl/cu128) or TORCH_WHEEL_DIR (a directory holding the
# torch 2.13.0 CUDA wheel, for machines without network), SKIP_DEMO=1 to skip the demo.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
PY=${SPARSEPO_PYTHON:-.venv/bin/python}
STEPS=${STEPS:-300}
MICRO=${MICRO:-8}
OUT=${OUT:-runs/gpu-bench}
mkdir -p "$OUT"
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-4} TOKENIZERS_PARALLELISM=false PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset DS_ACCELERATOR  # sparsepo sets it to cpu only when CUDA is absent

command -v nvidia-smi >/dev/null || { echo "gpu_bench: no nvidia-smi: this script needs a CUDA machine" >&2; exit 1; }
nvidia-smi --query-gpu=index,name,memory.total --format=csv,noheader
NGPU=${NGPU:-$(nvidia-smi -L | wc -l)}

# 1. torch with CUDA: the project pins the CPU wheel of torch 2.13.0; swap in the CUDA build of the same version.
if ! "$PY" -c "import torch, sys; sys.exit(0 if torch.cuda.is_available() else 1)"; then
  echo "gpu_bench: installing the CUDA build of torch 2.13.0"
  if [[ -n "${TORCH_WHEEL_DIR:-}" ]]; then
    "$PY" -m pip install --force-reinstall --no-deps --no-index --find-links "$TORCH_WHEEL_DIR" torch==2.13.0
  else
    "$PY" -m pip install --force-reinstall torch==2.13.0 --index-url "${TORCH_INDEX:-https://download.pytorch.org/whl/cu128}"
  fi
  "$PY" -c "import torch; assert torch.cuda.is_available(), 'torch still sees no CUDA device'; print('torch', torch.__version__, torch.version.cuda)"
fi
"$PY" -c "import torch; print('torch', torch.__version__, 'CUDA', torch.version.cuda, 'bf16', torch.cuda.is_bf16_supported())"

# 2. the demo (prepares the default demo world, which also gives the tokenizer and pairs used below)
if [[ "${SKIP_DEMO:-0}" != 1 ]]; then
  /usr/bin/time -f "demo wall %e s" "$PY" -m sparsepo.cli demo --workdir "$OUT/demo"
else
  "$PY" -m sparsepo.cli demo prepare --workdir "$OUT/demo"
fi
WORLD="$OUT/demo/world"

# 3. a ~0.5B Llama from config (vocab 32000, hidden 1024, 24 layers, MLP 4096: ~470M parameters), random init
MODEL="$OUT/llama-0.5b"
"$PY" - "$MODEL" "$WORLD/sft" <<'PYEOF'
import sys
from pathlib import Path
import torch
from transformers import AutoTokenizer, LlamaConfig, LlamaForCausalLM
out, tok_dir = Path(sys.argv[1]), sys.argv[2]
if not (out / "config.json").is_file():
    tok = AutoTokenizer.from_pretrained(tok_dir)
    cfg = LlamaConfig(vocab_size=32000, hidden_size=1024, intermediate_size=4096, num_hidden_layers=24,
                      num_attention_heads=16, num_key_value_heads=16, max_position_embeddings=512,
                      bos_token_id=tok.bos_token_id, eos_token_id=tok.eos_token_id, pad_token_id=tok.pad_token_id)
    torch.manual_seed(0)
    model = LlamaForCausalLM(cfg)
    model.save_pretrained(out)
    tok.save_pretrained(out)
    print(f"built {out}: {sum(p.numel() for p in model.parameters()) / 1e6:.0f}M parameters")
PYEOF

COMMON=(--config sparsepo/recipes/demo.yaml "model.path=$MODEL" "data.path=$WORLD/data/train.jsonl"
        method.name=dpo train.precision=bf16 "train.micro_batch_size=$MICRO" "train.max_steps=$STEPS"
        train.epochs=100 optim.lr=1e-5 logging.log_every=1 logging.overwrite=true logging.progress=false)

run() {  # run NAME NPROC OVERRIDES...: torchrun, one process per GPU, peak memory records in $OUT/NAME/mem
  local name=$1 nproc=$2; shift 2
  rm -rf "$OUT/$name/mem"
  echo "== $name: $nproc process(es)"
  GPU_BENCH_MEM="$OUT/$name/mem" /usr/bin/time -f "$name wall %e s" \
    "$PY" -m torch.distributed.run --standalone --nproc_per_node "$nproc" benchmarks/gpu_entry.py \
    "${COMMON[@]}" "logging.output_dir=$OUT/$name" "$@"
}

# 4. cache mode: the reference log-probs precomputed on all GPUs, then the policy on all GPUs
run precompute "$NGPU" reference.mode=precompute "reference.cache_dir=$OUT/ref_cache"
run cache "$NGPU" reference.mode=cache "reference.cache_dir=$OUT/ref_cache"
# 5. inline (reference forward inside the step, as TRL does) on the same GPUs
run inline "$NGPU" reference.mode=inline
# 6. live: NGPU-2 policy ranks + a 2-stage pipeline reference group on the last 2 GPUs; cache mode on the
#    same NGPU-2 policy GPUs is the baseline for the overlap ratio
POLICY=$((NGPU - 2))
if (( POLICY >= 1 )); then
  run cache-p$POLICY "$POLICY" reference.mode=cache "reference.cache_dir=$OUT/ref_cache"
  run live "$NGPU" reference.mode=live topology.reference_ranks=2 topology.pipeline_stages=2 reference.window=2
else
  echo "gpu_bench: $NGPU GPU(s): the live run needs >= 3 (1 policy + 2 pipeline stages); skipped"
fi

# 7. summary: median step time, tokens/s, peak memory per role, overlap ratio
"$PY" - "$OUT" "$NGPU" <<'PYEOF'
import json, statistics, sys
from pathlib import Path
sys.path.insert(0, "benchmarks")
from common import scalars
out, ngpu = Path(sys.argv[1]), int(sys.argv[2])
res = {}
for name in ("cache", "inline", f"cache-p{ngpu - 2}", "live"):
    run = out / name
    if not (run / "tensorboard").is_dir():
        continue
    st, tps = scalars(run, "train/step_time"), scalars(run, "train/tokens_per_s")
    keep = [s for s in sorted(st) if s > 10] or sorted(st)  # first 10 steps: warm-up, NCCL set-up
    mem = [json.loads(p.read_text()) for p in sorted((run / "mem").glob("rank*.json"))]
    n_ref = 2 if name == "live" else 0
    roles = {"policy": [m for m in mem if m["global_rank"] < len(mem) - n_ref],
             "reference": [m for m in mem if m["global_rank"] >= len(mem) - n_ref]}
    res[name] = {"step_ms_median": 1000 * statistics.median(st[s] for s in keep),
                 "tokens_per_s_median": statistics.median(tps[s] for s in keep),
                 "ref_wait_ms_mean": 1000 * statistics.mean(scalars(run, "train/ref_wait")[s] for s in keep),
                 "peak_mib_per_role": {r: [round(m.get("max_allocated_mib", float("nan"))) for m in ms]
                                       for r, ms in roles.items() if ms}}
if "live" in res and f"cache-p{ngpu - 2}" in res:
    res["overlap_ratio_live_over_cache"] = res["live"]["step_ms_median"] / res[f"cache-p{ngpu - 2}"]["step_ms_median"]
if "inline" in res and "cache" in res:
    res["inline_over_cache"] = res["inline"]["step_ms_median"] / res["cache"]["step_ms_median"]
(out / "summary.json").write_text(json.dumps(res, indent=1))
for name, r in res.items():
    if isinstance(r, dict):
        print(f"{name:>10}: step {r['step_ms_median']:.1f} ms, {r['tokens_per_s_median']:.0f} tokens/s, "
              f"ref wait {r['ref_wait_ms_mean']:.2f} ms, peak MiB per role {r['peak_mib_per_role']}")
for k in ("overlap_ratio_live_over_cache", "inline_over_cache"):
    if k in res:
        print(f"{k}: {res[k]:.3f}")
PYEOF
