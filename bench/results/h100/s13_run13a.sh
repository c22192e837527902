#!/bin/bash
# Session 13 call A: sync_check at the working tree; matrix (engine in-process) at 6d3e2d5 and the working tree;
# the app through the OpenAI door at 32 chats, 6d3e2d5 against the working tree alternated, two rounds (temperature 0.7).
C=${C:-wt}
T0=$SECONDS
nvidia-smi --query-gpu=name --format=csv,noheader
timeout 150 python3 -m bench.sync_check --out $OUT/sync_check.json > $OUT/sync_check.log 2>&1; echo "sync_check rc=$? t=$((SECONDS-T0))"; tail -15 $OUT/sync_check.log
M="--model random-weights:4b --precision bf16 --sections engine --streams 1,32 --cache-dir /tmp/qwen3vl-cache"
(cd abtrees/6d3e2d5 && timeout 100 python3 -m bench.matrix $M --out $OUT/mx_6d3e2d5.json > /tmp/mx_6d3e2d5.log 2>&1; echo "6d3e2d5 matrix rc=$? t=$((SECONDS-T0))"; grep -A3 "^path" /tmp/mx_6d3e2d5.log | head -3)
timeout 100 python3 -m bench.matrix $M --out $OUT/mx_$C.json > /tmp/mx_$C.log 2>&1; echo "$C matrix rc=$? t=$((SECONDS-T0))"; grep -A3 "^path" /tmp/mx_$C.log | head -3
A="--random-weights 4b --precision bf16 --engine batch --max-concurrency 32 --queue-size 64 --max-context 2048 --max-new-tokens 256 --warmup quick --cache-dir /tmp/qwen3vl-cache"
for round in 1 2; do
  (cd abtrees/6d3e2d5 && timeout 90 python3 -m bench.load_test --doors openai --chats 32 --seconds 18 --budget-s 80 --workdir /tmp/lt-a$round --json $OUT/lt_6d3e2d5_r$round.json -- $A > /tmp/lt_6d3e2d5_r$round.log 2>&1; echo "6d3e2d5 r$round rc=$? t=$((SECONDS-T0))"; tail -1 /tmp/lt_6d3e2d5_r$round.log)
  timeout 90 python3 -m bench.load_test --doors openai --chats 32 --seconds 18 --budget-s 80 --workdir /tmp/lt-b$round --json $OUT/lt_${C}_r$round.json -- $A > /tmp/lt_${C}_r$round.log 2>&1; echo "$C r$round rc=$? t=$((SECONDS-T0))"; tail -1 /tmp/lt_${C}_r$round.log
done
