"""The sbatch script skeleton that `megaent.slurm.render` fills in.

Placeholders are `{{name}}` (bash never writes two braces, so no escaping is
needed); `render.fill` refuses unknown or unused names. The skeleton is fixed
logic (signal forwarding, the wait loop, requeue); the variable parts (sbatch
header, environment, rollout servers, the train command) are rendered blocks.

Why this shape (measured on a local Slurm 22.05 cluster, tests/test_slurm_cluster.py):
- `--signal=B:USR1@N` reaches only this batch shell, and bash runs a trap only
  after the foreground command ends, so the trainer runs as `srun ... &` and
  the shell sits in `wait`, which a trapped signal interrupts. The trap sends
  USR1 to the training srun, which forwards it to every task on every node;
  the rollout servers are not signalled (they must keep answering until the
  trainer reaches its step boundary).
- The trainer checkpoints at the next step boundary and exits 3; the script
  then calls `scontrol requeue`, and the requeued job (SLURM_RESTART_COUNT
  >= 1) reruns the same command, which resumes from RUN_DIR.
- SIGTERM (scancel, preemption) reaches every step directly; the trainer
  checkpoints on it too, but the script never requeues after a TERM: a user's
  scancel must stay cancelled, and preemption requeues by itself.
"""

SBATCH_TEMPLATE = r"""#!/bin/bash
# megaent RL training job, rendered by `megaent submit` (megaent/slurm/render.py).
# {{summary}}
{{sbatch_lines}}

set -uo pipefail
# Installed first: an untrapped USR1 would kill this shell (bash's default action).
TRAIN_PID=
USR1_SEEN=0
TERM_SEEN=0
forward_usr1() {
  USR1_SEEN=$((USR1_SEEN + 1))
  echo "[megaent.sbatch] USR1 at $(date -Is): asking the trainer to checkpoint and exit 3"
  [ -n "$TRAIN_PID" ] && kill -USR1 "$TRAIN_PID" 2>/dev/null
}
note_term() {
  TERM_SEEN=1
  echo "[megaent.sbatch] TERM at $(date -Is): job cancelled or preempted; the trainer checkpoints on TERM"
  [ -n "$TRAIN_PID" ] && kill -TERM "$TRAIN_PID" 2>/dev/null
}
trap forward_usr1 USR1
trap note_term TERM

RUN_DIR={{run_dir}}
mkdir -p "$RUN_DIR/logs"
export PYTHONUNBUFFERED=1
echo "[megaent.sbatch] job $SLURM_JOB_ID restart ${SLURM_RESTART_COUNT:-0} on $SLURM_JOB_NODELIST at $(date -Is)"
{{setup}}
# ---- rendezvous ------------------------------------------------------------------------------
# Every task computes its rank from SLURM_PROCID/SLURM_NTASKS (megaent.parallel.launch); all of
# them meet at the first training node. The port follows the job id, so a requeued job (same id)
# reuses it and concurrent jobs on one node do not collide.
ALL_NODES=$(scontrol show hostnames "$SLURM_JOB_NODELIST")
TRAIN_NODES=$(echo "$ALL_NODES" | head -n {{train_nodes}} | paste -sd, -)
ROLLOUT_NODES=$(echo "$ALL_NODES" | tail -n +{{first_rollout_node}} | paste -sd, -)
export MASTER_ADDR=$(echo "$ALL_NODES" | head -n 1)
export MASTER_PORT=${MASTER_PORT:-$((20000 + SLURM_JOB_ID % 20000))}
{{env_lines}}
echo "[megaent.sbatch] train nodes: $TRAIN_NODES  rollout nodes: ${ROLLOUT_NODES:-none}  master: $MASTER_ADDR:$MASTER_PORT"

# ---- rollout servers (the last nodes of the allocation) --------------------------------------
ROLLOUT_OVERRIDES=()
{{rollout_block}}
# ---- training: one task per GPU (or per CPU rank) on the training nodes ----------------------
requeue() {
  echo "[megaent.sbatch] requeueing job $SLURM_JOB_ID; the next run resumes from $RUN_DIR"
  trap '' TERM
  scontrol requeue "$SLURM_JOB_ID"
  exit 0
}
# Stop requests before training starts (rollout servers still loading): requeue at once, nothing to save.
if [ "$USR1_SEEN" -gt 0 ]; then requeue; fi

{{train_srun}} &
TRAIN_PID=$!
# A trapped signal interrupts `wait` with status > 128 while srun still runs: wait again.
while :; do
  wait "$TRAIN_PID"
  RC=$?
  if [ "$RC" -gt 128 ] && kill -0 "$TRAIN_PID" 2>/dev/null; then continue; fi
  if [ "$RC" -gt 128 ] && [ "$USR1_SEEN" -gt 0 ]; then
    # srun ended just as the trap ran: its status is still waiting to be collected.
    wait "$TRAIN_PID" 2>/dev/null
    R2=$?
    [ "$R2" -ne 127 ] && RC=$R2
  fi
  break
done
echo "[megaent.sbatch] trainer exited with $RC at $(date -Is)"

# ---- requeue on "stopped early" (exit 3) -----------------------------------------------------
if [ "$RC" -eq {{requeue_exit_code}} ] && [ "$TERM_SEEN" -eq 0 ]; then requeue; fi
exit "$RC"
"""
