#!/usr/bin/env bash
# The CPU demo: warm a tiny policy on 1-3 digit addition (cached), then RL it with GRPO, Clip-Cov and KL-Cov,
# plot the three runs in one PNG and fit the entropy-performance law to the GRPO run.
# Usage: bash tools/demo.sh [OUT_DIR] [key=value ...]   (extra overrides go to all three runs)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/demo}
shift || true
export OMP_NUM_THREADS=${OMP_NUM_THREADS:-2} TOKENIZERS_PARALLELISM=false
for name in grpo clip_cov kl_cov; do
  cfg=configs/demo.yaml
  [ "$name" != grpo ] && cfg=configs/demo_${name}.yaml
  echo "== $name ($cfg) -> $out/$name"
  megaent train "$cfg" "trainer.run_dir=$out/$name" "$@"
done
megaent plot "$out/grpo" "$out/clip_cov" "$out/kl_cov" --out "$out/curves.png"
megaent fit-law "$out/grpo" --out "$out/entropy_law.png" || true
python - "$out" <<'PY'
import json, sys
from pathlib import Path
out = Path(sys.argv[1])
print(f"{'run':10s} {'entropy first':>13s} {'entropy last':>12s} {'reward first':>12s} {'reward last':>11s}")
for name in ("grpo", "clip_cov", "kl_cov"):
    rows = [json.loads(l) for l in (out / name / "metrics.jsonl").read_text().splitlines() if l.strip()]
    k = max(1, len(rows) // 5)  # average the first and last fifth: single steps are noisy
    avg = lambda rs, key: sum(r[key] for r in rs) / len(rs)
    print(f"{name:10s} {avg(rows[:k], 'entropy/mean'):13.3f} {avg(rows[-k:], 'entropy/mean'):12.3f} "
          f"{avg(rows[:k], 'reward/mean'):12.3f} {avg(rows[-k:], 'reward/mean'):11.3f}")
print(f"plots: {out / 'curves.png'}  {out / 'entropy_law.png'}")
PY
