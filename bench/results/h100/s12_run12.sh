#!/bin/bash
# Session 12's A/B in one call: the matrix (engine in-process) at f4d6cc3 and the working tree, then the app
# through the OpenAI door at 32 chats, f4d6cc3 against the working tree (two rounds), and 1 chat (working tree).
C=${C:-wt}
M="--model random-weights:4b --precision bf16 --sections engine --streams 1,32 --cache-dir /tmp/qwen3vl-cache"
(cd abtrees/f4d6cc3 && timeout 100 python3 -m bench.matrix $M --out $OUT/mx_f4d6cc3.json > $OUT/mx_f4d6cc3.log 2>&1; echo "f4d6cc3 matrix rc=$?"; grep -A3 "^path" $OUT/mx_f4d6cc3.log | head -3)
timeout 100 python3 -m bench.matrix $M --out $OUT/mx_$C.json > $OUT/mx_$C.log 2>&1; echo "$C matrix rc=$?"; grep -A3 "^path" $OUT/mx_$C.log | head -3
A="--random-weights 4b --precision bf16 --engine batch --max-concurrency 32 --queue-size 64 --max-context 2048 --max-new-tokens 256 --warmup quick --cache-dir /tmp/qwen3vl-cache"
for round in 1 2; do
  (cd abtrees/f4d6cc3 && timeout 100 python3 -m bench.load_test --doors openai --chats 32 --seconds 20 --budget-s 90 --workdir /tmp/lt-a$round --json $OUT/lt_f4d6cc3_r$round.json -- $A > $OUT/lt_f4d6cc3_r$round.log 2>&1; echo "f4d6cc3 r$round rc=$?"; tail -1 $OUT/lt_f4d6cc3_r$round.log)
  timeout 100 python3 -m bench.load_test --doors openai --chats 32 --seconds 20 --budget-s 90 --workdir /tmp/lt-b$round --json $OUT/lt_${C}_r$round.json -- $A > $OUT/lt_${C}_r$round.log 2>&1; echo "$C r$round rc=$?"; tail -1 $OUT/lt_${C}_r$round.log
done
timeout 80 python3 -m bench.load_test --doors openai --chats 1 --seconds 12 --budget-s 70 --workdir /tmp/lt-c --json $OUT/lt_${C}_1chat.json -- $A > $OUT/lt_${C}_1chat.log 2>&1; echo "$C 1 chat rc=$?"; tail -1 $OUT/lt_${C}_1chat.log
