#!/bin/bash
# issue 16, item 6: the pty test 20 times in a row with two CPU burners (yes) on the machine
cd "$(dirname "$0")/.."
yes > /dev/null & B1=$!
yes > /dev/null & B2=$!
trap "kill $B1 $B2" EXIT
pass=0
for i in $(seq 1 20); do
  s=$(date +%s)
  if timeout 600 .venv/bin/python -m pytest -q -p no:cacheprovider "tests/test_chat.py::test_pty_sixty_turns_overflow_and_a_50kb_paste" > /tmp/pty_run_$i.txt 2>&1; then pass=$((pass+1)); r=ok; else r=FAIL; fi
  echo "run $i: $r in $(( $(date +%s) - s )) s"
done
echo "$pass/20 passed"
