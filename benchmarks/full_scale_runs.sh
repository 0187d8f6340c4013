#!/usr/bin/env bash
# The 1,000-edit CounterFact runs of issues 4 (weight deltas) and 5 (COMEBA-HK) on SmolLM2, in two
# lanes of one thread each (the machine has 2 cores). Every run is resumable: rerunning a lane
# skips finished runs and continues the others after their last finished batch.
#
#   benchmarks/full_scale_runs.sh a > lane_a.log 2>&1 &
#   benchmarks/full_scale_runs.sh b > lane_b.log 2>&1 &
#
# Raw results go to benchmarks/results/{comeba,delta}/cf1000-* (not in git);
# benchmarks/summarize_lifelong.py turns them into the tables of benchmarks/results-pages/methods.md.
set -u
cd "$(dirname "$0")/.."
G=${GRACE_HOOKS:-grace-hooks}
D=${DATA:-../shared/data/counterfact-train.json}
COMMON="--n-records 1000 --eval-sample 200 --final-sample --gen-rounds 1 --threads 1 --data $D"
B100="--batch 100 --checkpoint-every 200"
B30="--batch 30 --checkpoint-every 240"
export OMP_NUM_THREADS=1
R=benchmarks/results
lane_a() {
  $G eval --method comeba_hk:gate=router,stop=most_probable $B100 $COMMON --out $R/comeba/cf1000-b100-router
  $G eval --method comeba_hk:gate=router,stop=most_probable $B30 $COMMON --out $R/comeba/cf1000-b30-router
  $G eval --method encore:mode=global --method memit:mode=global $B100 $COMMON --out $R/delta/cf1000-b100-global
  $G eval --method oedit:mode=global $B100 $COMMON --out $R/delta/cf1000-b100-oedit-global
}
lane_b() {
  $G eval --method comeba_hk:gate=zscore,stop=most_probable $B100 $COMMON --out $R/comeba/cf1000-b100-zscore
  $G eval --method comeba_hk:gate=zscore,stop=most_probable $B30 $COMMON --out $R/comeba/cf1000-b30-zscore
  $G eval --method encore:mode=routed --method memit:mode=routed $B100 $COMMON --out $R/delta/cf1000-b100-routed
  $G eval --method oedit:mode=routed $B100 $COMMON --out $R/delta/cf1000-b100-oedit-routed
}
case "${1:-}" in
  a) lane_a ;;
  b) lane_b ;;
  *) echo "usage: $0 a|b" >&2; exit 2 ;;
esac
