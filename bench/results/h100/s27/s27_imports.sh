# Session 27: why the device's imports take 2-3x this 2-core VM's (engine process imported at +12.1 s in call 3).
set +e
R=/tmp/imp; mkdir -p $R
python3 -m pip install -q --no-index --no-deps --no-compile --no-cache-dir --upgrade --target /tmp/site .whl/*.whl
{ nproc; lscpu | grep -E "Model name|MHz|^CPU\(s\)"; uptime; df -hT /tmp /usr 2>/dev/null
  T=$(python3 -c "import os,importlib.util as u;print(os.path.dirname(u.find_spec('torch').origin))")
  echo "torch at $T"; mount | grep -E " / | /usr" | head -3
  echo "py: $(find $T -name '*.py' | wc -l)  pyc: $(find $T -name '*.pyc' | wc -l)  writable: $(test -w $T/__pycache__ && echo yes || echo no)"
  env | grep -E "PYTHON" ; } > $R/env.txt 2>&1
cat $R/env.txt
imp() { n=$1; shift; for i in 1 2; do /usr/bin/time -f "$n run$i %e s wall %U user %S sys" python3 -X importtime -c "$*" 2> $R/$n.$i.txt; tail -1 $R/$n.$i.txt; done; }
imp torch "import torch"
export PYTHONPATH=/tmp/site
imp engine "import torch; from qwen3vl_webui.weights import lean; lean.skip(*lean.ENGINE_PROCESS); import transformers.models.qwen3_vl.modeling_qwen3_vl"
imp gradio "import gradio"
imp tv "import torch, torchvision"
imp front "import torch; from qwen3vl_webui.weights import lean; lean.skip(*lean.NEVER_USED); from transformers import AutoProcessor; from qwen3vl_webui.weights import random_weights; random_weights.build_front('random-weights:4b')"
SP=$(python3 -c "import os,torch;print(os.path.dirname(os.path.dirname(torch.__file__)))"); /usr/bin/time -f "compileall %e s" timeout 120 python3 -m compileall -q -j 16 $SP > /dev/null 2>$R/compileall.err; echo "compileall $SP rc=$?"; tail -2 $R/compileall.err
echo "pyc after: $(find $(python3 -c "import os,torch;print(os.path.dirname(torch.__file__))") -name '*.pyc' | wc -l)"
imp torchpyc "import torch"
imp enginepyc "import torch; from qwen3vl_webui.weights import lean; lean.skip(*lean.ENGINE_PROCESS); import transformers.models.qwen3_vl.modeling_qwen3_vl"
tar czf $OUT/imp.tgz -C /tmp imp
