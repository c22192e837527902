#!/bin/bash
# Session 13 call E: the gradio door at 32 chats, de27e6e (Nagle on) against the working tree (TCP_NODELAY), alternated.
C=${C:-wt}
T0=$SECONDS
A="--random-weights 4b --precision bf16 --engine batch --max-concurrency 32 --queue-size 64 --max-context 2048 --max-new-tokens 256 --warmup quick --cache-dir /tmp/qwen3vl-cache"
timeout 100 python3 -m bench.load_test --doors gradio --chats 32 --seconds 14 --budget-s 95 --workdir /tmp/lgw --json $OUT/lt_${C}_gradio_w.json -- $A > /tmp/lgw.log 2>&1; echo "warm (compile) $C rc=$? t=$((SECONDS-T0))"; tail -1 /tmp/lgw.log
(cd abtrees/de27e6e && timeout 70 python3 -m bench.load_test --doors gradio --chats 32 --seconds 16 --budget-s 65 --workdir /tmp/lga --json $OUT/lt_de27e6e_gradio.json -- $A > /tmp/lga.log 2>&1; echo "de27e6e rc=$? t=$((SECONDS-T0))"; tail -1 /tmp/lga.log)
timeout 70 python3 -m bench.load_test --doors gradio --chats 32 --seconds 16 --budget-s 65 --workdir /tmp/lgb --json $OUT/lt_${C}_gradio.json -- $A > /tmp/lgb.log 2>&1; echo "$C rc=$? t=$((SECONDS-T0))"; tail -1 /tmp/lgb.log
