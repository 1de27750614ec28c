#!/usr/bin/env bash
# The CPU demo: warm one tiny policy on single-digit addition (cached in ~/.cache/megaent), then RL it with GRPO,
# Clip-Cov and KL-Cov, each with several seeds (same starting policy; the seed drives sampling, data order and
# Clip-Cov's random pick), two runs at a time on one thread each. Prints a table of mean +- std across seeds of
# entropy and reward over the first and last fifth of the steps, draws every method's mean with a min-max band
# over seeds (curves.png, with predicted vs measured entropy change per step), fits the entropy-performance law to
# the GRPO runs (entropy_law.png) and prints each GRPO run's predicted-vs-measured dH correlations.
# Usage: bash tools/demo.sh [OUT_DIR] [key=value ...]   (extra overrides go to every run)
#   DEMO_SEEDS="0 1 2" (seeds per method), DEMO_JOBS=2 (runs at a time; one CPU core each),
#   DEMO_CONTROLLER=1 adds KL-Cov steered by the entropy controller (configs/demo_controller.yaml; ~+3 min)
set -euo pipefail
cd "$(dirname "$0")/.."
out=${1:-runs/demo}
shift || true
seeds=${DEMO_SEEDS:-0 1 2}
jobs=${DEMO_JOBS:-2}
methods="grpo clip_cov kl_cov"
[ "${DEMO_CONTROLLER:-0}" = 1 ] && methods="$methods controller"
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
mkdir -p "$out"
start=$SECONDS

echo "== warm-up: the tiny starting policy shared by all runs (cached after the first time)"
policy=$(python - "$@" 2> "$out/warmup.log" <<'PY'
import sys
from megaent.config import load_config
from megaent.data.warmup import warmup_policy
from megaent.trainer.components import demo_policy_dir
cfg = load_config("configs/demo.yaml", [a for a in sys.argv[1:] if not a.startswith("trainer.run_dir=")])
if cfg.model.path:
    print(cfg.model.path)
else:
    d = demo_policy_dir(cfg.data.task, cfg.trainer.seed, digits=cfg.data.task_max_digits,
                        steps=cfg.model.demo_warmup_steps)
    print(warmup_policy(d, seed=cfg.trainer.seed, steps=cfg.model.demo_warmup_steps,
                        max_digits=cfg.data.task_max_digits))
PY
) || { echo "demo: warm-up failed:" >&2; tail -n 20 "$out/warmup.log" >&2; exit 1; }
echo "   $policy ($((SECONDS - start)) s)"

run_one() {  # name config seed [overrides]: one run, its log in OUT_DIR/NAME_seedS.log
  local name=$1 cfg=$2 seed=$3
  shift 3
  local dir="$out/${name}_seed$seed" t0=$SECONDS
  if megaent train "$cfg" "trainer.run_dir=$dir" "trainer.seed=$seed" "model.path=$policy" trainer.threads=1 \
      trainer.quiet=true "$@" > "$dir.log" 2>&1; then
    echo "   done ${name}_seed$seed in $((SECONDS - t0)) s: $(grep -o 'step [0-9]*/[0-9]*.*entropy [0-9.]*' "$dir.log" | tail -n 1)"
  else
    echo "   FAILED ${name}_seed$seed: see $dir.log" >&2
    tail -n 5 "$dir.log" >&2
    touch "$dir.failed"
  fi
}

echo "== RL: {$methods} x seeds {$seeds}, $jobs at a time (logs: $out/*.log)"
rm -f "$out"/*.failed
for seed in $seeds; do
  for name in $methods; do
    cfg=configs/demo.yaml
    [ "$name" != grpo ] && cfg=configs/demo_${name}.yaml
    while [ "$(jobs -rp | wc -l)" -ge "$jobs" ]; do wait -n || true; done
    run_one "$name" "$cfg" "$seed" "$@" &
  done
done
wait
if ls "$out"/*.failed > /dev/null 2>&1; then echo "demo: some runs failed (see above)" >&2; exit 1; fi
echo "   all runs done ($((SECONDS - start)) s)"

runs=()
for name in $methods; do for seed in $seeds; do runs+=("$out/${name}_seed$seed"); done; done
megaent plot "${runs[@]}" --out "$out/curves.png" > /dev/null
grpo_runs=()
for seed in $seeds; do grpo_runs+=("$out/grpo_seed$seed"); done
megaent fit-law "${grpo_runs[@]}" --out "$out/entropy_law.png" || true
python - "${runs[@]}" <<'PY'
import sys
from megaent.trainer.plots import format_summary, seed_summary
print("\nmean +- std across seeds of each run's average over its first / last fifth of the steps:")
print(format_summary(seed_summary(sys.argv[1:])))
from megaent.trainer.plots import dynamics_correlations, format_dynamics
grpo = [d for d in sys.argv[1:] if "/grpo_seed" in d]
print("\nper GRPO run: correlation over its steps of measured dH with the exact prediction -Cov(log pi, dz),")
print("the same with the second-order term added, and with the advantage-covariance estimate -lr Cov(log pi, A):")
print(format_dynamics(dynamics_correlations(grpo)))
PY
echo "plots: $out/curves.png  $out/entropy_law.png   (demo wall time $((SECONDS - start)) s)"
