#!/usr/bin/env python3
"""Per-example verdicts of `lab loadtest --validate` (bench/out/validate/results.json) vs `lab eval --out`
(bench/out/validate/eval-{a,b,c}.jsonl) on the examples the load test sent. See BENCHMARKS.md."""
import json, collections
r = json.load(open('bench/out/validate/results.json'))
by = collections.defaultdict(dict)
for q in r['requests']:
    if q['correct'] is not None:
        by[q['domain']][q['example']] = q['correct']
tot_same = tot = 0
for d in 'abc':
    D = d.upper()
    ev = {}
    for i, line in enumerate(open(f'bench/out/validate/eval-{d}.jsonl')):
        o = json.loads(line)
        ev[o.get('index', i)] = o['correct']
    hits = by[D]
    same = sum(1 for k, v in hits.items() if ev.get(k) == v)
    lt = sum(hits.values()); le = sum(ev[k] for k in hits)
    print(f"{D}: {len(hits)} examples (ids {min(hits)}..{max(hits)}): loadtest --validate {lt}/{len(hits)} = {100*lt/len(hits):.0f}%, lab eval {le}/{len(hits)} = {100*le/len(hits):.0f}%, same verdict on {same}/{len(hits)}")
    tot_same += same; tot += len(hits)
print(f"all: same verdict on {tot_same}/{tot}")
