#!/usr/bin/env bash
# GPU check of megaent's training paths on one CUDA GPU (about 5 minutes on an H100/H200), log in $OUT/gpu_check.txt.
#  A. pytest -m gpu: megatron-core's engine through the trainer's load_policy/build_engine in bf16 on the GPU
#     against HF fp32 (tests/test_gpu_engine.py; TE spec and FP8 recipes when Transformer Engine imports), the
#     inference decoder's backends (tests/test_gpu_path.py);
#  B. host objects over gloo and device tensors over NCCL on the cpu:gloo,cuda:nccl world init_parallel starts;
#  C. `megaent train configs/demo.yaml` 2 steps in bf16 on the GPU;
#  D. tools/bench_train.py --device cuda: a 1.5B-shaped Qwen2 update (bf16; fp8 too with TE), tokens/s against
#     HF + torch AdamW measured in the same run, MFU and peak memory.
# Wheels the machine lacks (megatron-core, omegaconf, torchao) may be put in .whl/ (pip download --no-deps).
# Usage: OUT=/tmp/gc bash tools/gpu_check.sh
set -uo pipefail
cd "$(dirname "$0")/.."
OUT=${OUT:-/tmp/gpu_check}; mkdir -p "$OUT"
if ls .whl/*.whl > /dev/null 2>&1; then
  python3 -m pip install -q --no-index --no-deps --target /tmp/megaent_site .whl/*.whl || exit 9
  export PYTHONPATH=/tmp/megaent_site:$PWD
else
  export PYTHONPATH=$PWD
fi
export MASTER_ADDR=127.0.0.1 MASTER_PORT=29533
fp8=$(python3 -c 'import transformer_engine' 2>/dev/null && echo ,fp8)
{
echo "== A pytest -m gpu"
timeout 150 python3 -m pytest -q -m gpu tests/test_gpu_engine.py tests/test_gpu_path.py 2>&1 | grep -aE "Error|passed|failed" | tail -6
echo "== B object and tensor collectives"
timeout 60 python3 -c '
import torch, torch.distributed as dist
from megaent.parallel import init_parallel
st = init_parallel(1, 1)
box = [{"rewards": [1.0]}] ; dist.broadcast_object_list(box, src=0, group=st.dp_group)
t = torch.ones(2, device=st.device); dist.all_reduce(t, group=st.dp_group)
f = torch.ones(1, device="cpu"); dist.all_reduce(f)
print("B ok", st.device, dist.get_backend(), box[0], t.tolist(), f.tolist())' 2>&1 | tail -2
echo "== C megaent train on the GPU"
timeout 120 python3 -m megaent.cli train configs/demo.yaml trainer.steps=2 trainer.run_dir="$OUT/run" \
  model.dtype=bfloat16 model.precision=bf16 trainer.quiet=true 2>&1 | tail -3
echo "== D bench_train --device cuda (precisions bf16$fp8)"
timeout 300 python3 tools/bench_train.py --device cuda --precisions "bf16$fp8" --steps 3 --tmp /tmp 2>&1 | tail -6
} 2>&1 | tee "$OUT/gpu_check.txt"
