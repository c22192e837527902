#!/bin/bash
# Session 13 call B (warm machine after call A): the gradio door at 32 chats with 4 and 8 chats per client process,
# the OpenAI door at temperature 0 (32 chats), 1 chat, and 64 chats (concurrency 64), all at the working tree.
C=${C:-wt}
T0=$SECONDS
A="--random-weights 4b --precision bf16 --engine batch --max-concurrency 32 --queue-size 64 --max-context 2048 --max-new-tokens 256 --warmup quick --cache-dir /tmp/qwen3vl-cache"
for cpp in 4 8; do
  timeout 95 python3 -m bench.load_test --doors gradio --chats 32 --chats-per-process $cpp --seconds 20 --budget-s 85 --workdir /tmp/lg$cpp --json $OUT/lt_${C}_gradio_cpp$cpp.json -- $A > /tmp/lg$cpp.log 2>&1; echo "gradio cpp=$cpp rc=$? t=$((SECONDS-T0))"; tail -1 /tmp/lg$cpp.log
done
timeout 85 python3 -m bench.load_test --doors openai --chats 32 --temperature 0 --seconds 18 --budget-s 75 --workdir /tmp/lt0 --json $OUT/lt_${C}_t0.json -- $A > /tmp/lt0.log 2>&1; echo "openai t0 rc=$? t=$((SECONDS-T0))"; tail -1 /tmp/lt0.log
timeout 75 python3 -m bench.load_test --doors openai --chats 1 --seconds 12 --budget-s 65 --workdir /tmp/lt1 --json $OUT/lt_${C}_1chat.json -- $A > /tmp/lt1.log 2>&1; echo "openai 1 chat rc=$? t=$((SECONDS-T0))"; tail -1 /tmp/lt1.log
A64="--random-weights 4b --precision bf16 --engine batch --max-concurrency 64 --queue-size 128 --max-context 2048 --max-new-tokens 256 --warmup quick --cache-dir /tmp/qwen3vl-cache"
timeout 110 python3 -m bench.load_test --doors openai --chats 64 --seconds 20 --budget-s 100 --workdir /tmp/lt64 --json $OUT/lt_${C}_64.json -- $A64 > /tmp/lt64.log 2>&1; echo "openai 64 rc=$? t=$((SECONDS-T0))"; tail -1 /tmp/lt64.log
