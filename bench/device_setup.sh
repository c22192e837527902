# Sourced by a device call's script (`. bench/device_setup.sh NAME`): the carried wheels installed once per machine
# (`.whl/`, bench/README), the environment every bench process needs, the results folder /tmp/NAME with the GPU's
# name in gpu.txt, and `pack`, which tars that folder into $OUT (call it after each step: a call can stop anywhere).
[ -d /tmp/site/gradio ] || python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade \
  --target /tmp/site .whl/*.whl
export PYTHONPATH=/tmp/site PYTHONUNBUFFERED=1 GRADIO_ANALYTICS_ENABLED=False BENCH_COMMIT=${BENCH_COMMIT:-unknown}
R=/tmp/$1
mkdir -p "$R"
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv,noheader | tee "$R/gpu.txt"
pack() { tar czf "$OUT/$(basename "$R").tgz" -C /tmp "$(basename "$R")"; }
