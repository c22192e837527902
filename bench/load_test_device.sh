#!/usr/bin/env bash
# Device run of bench/load_test.py (issue 3): the app with random 4B weights, bf16, batch engine, on loopback.
# Carry .whl_gradio (gradio, gradio_client and what the device image lacks) and .whl_tf (transformers 5.23, psutil).
set -o pipefail
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site \
    .whl_gradio/*.whl .whl_tf/*.whl || exit 1
export PYTHONPATH=/tmp/site:$PWD PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader
python3 -c "import gradio, gradio_client, transformers, torch; print('gradio', gradio.__version__, 'client', \
gradio_client.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)" || exit 1
python3 bench/load_test.py --chats "${CHATS:-1,16,32}" --seconds "${SECONDS_EACH:-60}" --prompt-tokens 512 \
    --new-tokens 256 --workdir /tmp/load --json "${OUT:-/tmp}/load_test.json" -- \
    --random-weights 4b --precision bf16 --engine batch --max-concurrency 32 --queue-size 64 \
    --max-context 1024 --max-new-tokens 256 --warmup quick --cache-dir /tmp/qwen3vl-cache
code=$?
cp /tmp/load/server.log "${OUT:-/tmp}/server.log" 2>/dev/null
exit $code
