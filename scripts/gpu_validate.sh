#!/usr/bin/env bash
# Run on a GPU machine (the device tool's H100/H200) from the repo root:
#   the package built with its CUDA C++, the whole test suite on CUDA (kernels, fused LM head,
#   trainers), the benchmarks (policy_loss, the fused LM head, vLLM rollouts when vllm is carried),
#   everything written under $OUT (default ./gpu-out). Stages: all | test | bench | vllm.
# The GPU machine reaches no package registry: its image has torch, triton,
# scikit-build-core, pybind11, cmake and ninja; other packages come as wheels in .whl/
# (scripts/fetch_gpu_wheels.sh, run here first; .whl/ is git-ignored, name it in `carry`).
set -uo pipefail
OUT=${OUT:-gpu-out}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1 TRITON_DEFAULT_FP_FUSION=1
if ls .whl/*.whl >/dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl \
    && export PYTHONPATH=/tmp/site
fi
{ nvidia-smi; python3 -c "import torch, triton; print('torch', torch.__version__, 'cuda', torch.version.cuda, 'triton', triton.__version__)"; } \
  > "$OUT/device.txt" 2>&1
( time python3 -m pip install -q --no-build-isolation --no-deps -e . ) > "$OUT/build.log" 2>&1 || { cat "$OUT/build.log"; exit 1; }
python3 -c "import grpo_fast._C as c; print('CUDA compiled in:', c.has_cuda())" >> "$OUT/build.log" 2>&1
STAGE=${1:-all}
if [[ $STAGE == all || $STAGE == test ]]; then
  python3 -m pytest tests -q -ra -p no:cacheprovider 2>&1 | tee "$OUT/tests.log" | tail -40
fi
if [[ $STAGE == all || $STAGE == bench ]]; then
  python3 -m pytest bench/bench_policy_loss.py -q -p no:cacheprovider --benchmark-json="$OUT/bench_policy_loss.json" \
    --benchmark-columns=median,min,rounds 2>&1 | tee "$OUT/bench.log" | tail -60
  python3 bench/report.py "$OUT/bench_policy_loss.json" > "$OUT/RESULTS-gpu.md" && cat "$OUT/RESULTS-gpu.md"
  # the fused LM head (issue 12): N = 16384, H in {896, 4096}, V = 151936, bf16, against TRL's chunked op
  python3 -m pytest bench/bench_fused_head.py -q -p no:cacheprovider --benchmark-json="$OUT/bench_fused_head.json" \
    --benchmark-columns=median,min,rounds 2>&1 | tee "$OUT/bench_fused_head.log" | tail -40
  python3 bench/report.py "$OUT/bench_fused_head.json" >> "$OUT/RESULTS-gpu.md"
fi
if [[ $STAGE == all || $STAGE == vllm ]]; then
  # vLLM on the GPU only when a `vllm` wheel was carried in .whl/ (it pins its own CUDA torch)
  python3 -c "import vllm" 2>/dev/null && python3 bench/bench_rollout.py 2>&1 | tee "$OUT/bench_rollout.log" | tail -20 \
    || echo "vllm not importable on the GPU machine: the vLLM GPU benchmark stays unmeasured" | tee "$OUT/bench_rollout.log"
fi
