#!/usr/bin/env bash
# The whole test suite on CPU, as CI runs it (.ci/run). About 25 min on a 2-core machine (25 min 11 s measured). It
#  1. installs megaent with its test extra and the exact CPU torch build: pip install -e '.[cpu,test]';
#  2. enables the real-Slurm tests (MEGAENT_SLURM_TESTS=1, tests/test_slurm_cluster.py). As root these run
#     slurm/local_cluster.sh start: apt-get install slurm-wlm munge, write /etc/slurm/slurm.conf and
#     /etc/munge/munge.key, start munged, slurmctld and slurmd (one node on 127.0.0.1). Not root: they skip.
#     tests/test_slurm_multinode.py also brings up slurm/netns_cluster.sh (3 nodes in network namespaces).
#  3. runs pytest, and on exit (pass, fail or Ctrl-C) stops every Slurm daemon that was not already running
#     when it began, and removes the 3-node cluster (daemons, namespaces, bridge) if this run created it.
# MEGAENT_SLURM_TESTS=0 bash tools/test.sh: no Slurm (nothing installed but pip packages, no daemons).
# Extra arguments go to pytest: bash tools/test.sh tests/test_cli_help.py -x
set -euo pipefail
cd "$(dirname "$0")/.."
python -m pip install -q -e '.[cpu,test]' && python -m pip install -q --no-deps 'sglang==0.5.23'
export OMP_NUM_THREADS=1 TOKENIZERS_PARALLELISM=false
export MEGAENT_SLURM_TESTS=${MEGAENT_SLURM_TESTS:-1}

DAEMONS=(slurmd slurmctld munged)  # stop order
running() { pgrep -a -x "$1" 2>/dev/null | grep -qv slurm-megaent-multi; }  # the one-node cluster's
before=()
for d in "${DAEMONS[@]}"; do running "$d" && before+=("$d"); done
# The 3-node cluster of tests/test_slurm_multinode.py (slurm/netns_cluster.sh): namespaces, bridge, daemons.
multi_up() { ip netns list 2>/dev/null | grep -q '^megaent-mgnode'; }
multi_before=0
multi_up && multi_before=1

stop_started() {
  local d started=()
  if [ "$multi_before" = 0 ] && multi_up; then
    echo "tools/test.sh: removing the 3-node netns Slurm cluster this run started" >&2
    bash slurm/netns_cluster.sh stop || true
  fi
  for d in "${DAEMONS[@]}"; do
    if running "$d" && [[ " ${before[*]} " != *" $d "* ]]; then started+=("$d"); fi
  done
  if [ ${#started[@]} -gt 0 ]; then
    echo "tools/test.sh: stopping the Slurm daemons this run started: ${started[*]}" >&2
    bash slurm/local_cluster.sh stop "${started[@]}" || true
  fi
}
trap stop_started EXIT

if [ "$MEGAENT_SLURM_TESTS" = 1 ]; then
  if [ "$(id -u)" = 0 ]; then
    echo "tools/test.sh: real-Slurm tests on: they install slurm-wlm/munge (apt) and start a local cluster;" \
         "stopped again at the end (MEGAENT_SLURM_TESTS=0 to skip them)" >&2
  else
    echo "tools/test.sh: not root: the real-Slurm tests will skip" >&2
  fi
fi
start=$SECONDS
rc=0
python -m pytest -q --durations=30 "$@" || rc=$?
echo "tools/test.sh: pytest exit $rc after $(( (SECONDS - start) / 60 )) min $(( (SECONDS - start) % 60 )) s" >&2
exit "$rc"
