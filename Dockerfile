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
# The page answers as soon as the server is up; the model loads behind it (status line in the UI). With a login
# set, / answers the login page (200), so this check holds either way.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD curl -fsS http://127.0.0.1:7860/ >/dev/null || exit 1
CMD ["python", "app.py"]
