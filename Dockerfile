# Qwen3-VL WebUI on a CUDA server: docker build -t qwen3vl-webui . && docker run --gpus all -p 7860:7860 qwen3vl-webui
FROM nvidia/cuda:12.8.1-cudnn-runtime-ubuntu24.04

# It listens on all interfaces, so anyone who can reach the port can chat and upload unless a login is set:
#   docker run ... -e QWEN3VL_AUTH=user:password ...   (or mount a file and set QWEN3VL_AUTH_FILE=/path)
# Without one the app prints at start: "warning: serving without a login on 0.0.0.0:7860: ...".
# Behind a reverse proxy, set QWEN3VL_TRUSTED_PROXIES=<its address> so the login limit sees each visitor.
# Uploads are deleted after 60 minutes or beyond 2 GB in total (QWEN3VL_UPLOAD_MAX_AGE_MINUTES, QWEN3VL_UPLOAD_CACHE_MB).
ENV DEBIAN_FRONTEND=noninteractive PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 \
    QWEN3VL_HOST=0.0.0.0 QWEN3VL_PORT=7860 HF_HOME=/home/app/.cache/huggingface GRADIO_ANALYTICS_ENABLED=False
RUN apt-get update && apt-get install -y --no-install-recommends python3 python3-venv curl \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 app
WORKDIR /home/app/qwen3vl-webui
RUN python3 -m venv /opt/venv && chown -R app /opt/venv
ENV PATH=/opt/venv/bin:$PATH

COPY --chown=app requirements.txt .
RUN pip install -r requirements.txt
COPY --chown=app . .

# Non-root: the demo checkpoint and caches go to /home/app/.cache (private to this user).
USER app
EXPOSE 7860

# Cold start (issue 14). The app serves within seconds of loading the weights, from eager decode steps in CUDA graphs
# whose layers run our fused Triton kernels: where those serve, nothing compiles and the first answer is at full
# speed. Otherwise it compiles the decode step in the background (about a minute per batch size on a fresh machine),
# swapping each in as it is ready. A start leaves portable artifacts in the cache dir: compiled/kernels-<hash>.artifacts
# (our kernels' builds, per GPU and torch/triton versions) and, where it compiled, compiled/decode-<hash>.artifacts
# (per GPU, versions, precision, model and engine flags); with matching ones a start builds and compiles nothing.
# Two ways to keep them:
#   1. A volume for the cache dir, which every start reuses (a Space with persistent storage: QWEN3VL_CACHE_DIR=/data):
#        docker run --gpus all -v qwen3vl-cache:/home/app/.cache/qwen3vl-webui -p 7860:7860 qwen3vl-webui
#   2. Baked into an image for a known GPU. `docker build` sees no GPU, so write them with a container on a machine
#      with that GPU, with the serving flags (KV sizes are part of the key), then build a small image on top:
#        docker run --rm --gpus all -v "$PWD/artifacts:/artifacts" qwen3vl-webui \
#            python -m qwen3vl_webui.precompile --cache-dir /artifacts --precision bf16 --max-concurrency 8
#        printf 'FROM qwen3vl-webui\nCOPY --chown=app artifacts/compiled /home/app/.cache/qwen3vl-webui/compiled\nCOPY --chown=app artifacts/triton /home/app/.cache/qwen3vl-webui/triton\n' \
#            | docker build -t qwen3vl-webui:h100 -f - .
#      (triton/ holds the builds of the app's own Triton kernels: GEMV, attention, int4/fp8 matmuls; optional.)
#      A file made for another GPU or other versions is ignored with one log line (the app then compiles).

# GET /health: 200 while the process serves HTTP (liveness). GET /ready: 200 once the model is loaded and chats are
# admitted, 503 while loading, switching precision, restarting the engine or draining; its JSON says whether decode
# runs at full compiled speed. Neither needs the login. Kubernetes: livenessProbe /health, readinessProbe /ready.
# Here "healthy" means ready: the start period covers a download and load; a precision switch (~20 s) fits the retries.
HEALTHCHECK --interval=15s --timeout=5s --start-period=180s --retries=4 \
    CMD curl -fsS "http://127.0.0.1:${QWEN3VL_PORT:-7860}/ready" >/dev/null || exit 1
CMD ["python", "app.py"]
