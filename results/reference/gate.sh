#!/usr/bin/env bash
# The regression gate's runs (docs/evaluation.md, "The regression gate"): every method in methods.txt on the
# default suite, seed 0, at a reduced budget (60 DAP steps a domain instead of 150; the last row and the
# diagonal evaluated), into folder $1. CI runs it into a scratch folder and checks it against this folder;
# `CPT_BENCH_CACHE=$(mktemp -d) bash results/reference/gate.sh results/reference` remakes the reference (after a
# deliberate change) as CI runs it: a fresh cache and the default thread count (a base model built on another
# thread count differs in its floats, and so does every score; so does one built on another CPU: on 2026-12-07
# the code of 162650a no longer reproduced the reference made on an earlier machine, and it was remade here).
set -euo pipefail
here="$(cd "$(dirname "$0")" && pwd)"
for method in $(cat "$here/methods.txt"); do
    cpt-bench run --method "$method" --eval final --seed 0 --steps 60 --output "$1" --quiet > /dev/null
done
