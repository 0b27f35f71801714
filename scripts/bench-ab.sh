#!/usr/bin/env bash
# Two builds of tensorbus alternated in one run, six times each:
#   scripts/bench-ab.sh OLD_DIR NEW_DIR
# where each DIR holds a release `tensorbus` and `tensorbus-bench` (e.g. from
# `git worktree add --detach ../old REV && cargo build --release -p tensorbus-cli -p tensorbus-bench`).
# Prints old and new percentiles of `tensorbus bench --sizes 8,1MiB --only limit,tensorbus-`
# (override with AB_ONLY=..., e.g. AB_ONLY=limit,tensorbus-,streaming/tensorbus; extra
# arguments for the new binary only in AB_NEW_ARGS, e.g. --extension-ids, and for the
# old one in AB_OLD_ARGS: one binary against itself, e.g. the metrics off and on:
#   AB_OLD_ARGS="--latency-sample-every 0" scripts/bench-ab.sh target/release target/release).
set -euo pipefail
old=${1:?usage: scripts/bench-ab.sh OLD_DIR NEW_DIR}
new=${2:?usage: scripts/bench-ab.sh OLD_DIR NEW_DIR}
declare -A dir=([old]=$old [new]=$new)
# AB_REPORT_ONLY=1: only print the table of the last run's JSON files again.
if [ -z "${AB_REPORT_ONLY:-}" ]; then
for i in 1 2 3 4 5 6; do
  for v in old new; do
    extra="${AB_OLD_ARGS:-}"
    if [ "$v" = new ]; then extra="${AB_NEW_ARGS:-}"; fi
    # shellcheck disable=SC2086
    "${dir[$v]}/tensorbus" bench --sizes 8,1MiB --only "${AB_ONLY:-limit,tensorbus-}" $extra --json /tmp/ab-$v-$i.json > /dev/null 2>&1
  done
done
fi
python3 - <<'PY'
import json,statistics as st
rows={}
for v in ['old','new']:
    for i in range(1,7):
        d=json.load(open(f'/tmp/ab-{v}-{i}.json'))
        for r in d['rows']:
            k=(r.get('bench',''),r['contender'],r['variant'],r['size_bytes'])
            rows.setdefault(k,{}).setdefault(v,[]).append((r['p50_ns'],r['p99_ns'],r['p999_ns'],r.get('msgs_per_s') or 0))
print("| bench | contender | variant | size | old p50 (per run) | new p50 (per run) | median p50 old→new | median p99 old→new | median p99.9 old→new | new/old p50 | median msgs/s old→new | new/old msgs/s |")
print("|---|---|---|---:|---|---|---|---|---|---:|---|---:|")
for k,vv in sorted(rows.items(), key=lambda x:(x[0][0],x[0][3],x[0][1],x[0][2])):
    if 'old' not in vv or 'new' not in vv: continue
    o=vv['old']; n=vv['new']
    med=lambda xs,j: st.median(x[j] for x in xs)
    f=lambda ns: f"{ns/1000:.2f}"
    rate=f"{med(o,3):,.0f} → {med(n,3):,.0f} | {med(n,3)/med(o,3):.3f}" if med(o,3) else "— | —"
    print(f"| {k[0]} | {k[1]} | {k[2]} | {k[3]} | {' '.join(f(x[0]) for x in o)} | {' '.join(f(x[0]) for x in n)} | {f(med(o,0))} → {f(med(n,0))} | {f(med(o,1))} → {f(med(n,1))} | {f(med(o,2))} → {f(med(n,2))} | {med(n,0)/med(o,0):.3f} | {rate} |")
PY
