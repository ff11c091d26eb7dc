# spikelm's OpenAI-compatible server on CPU.
#   docker build -t spikelm .
#   docker run --rm -p 8000:8000 -v "$PWD/runs:/app/runs" spikelm
#   docker run --rm -p 8000:8000 -v /path/to/model:/model -e SPIKELM_MODEL=/model -e SPIKELM_API_KEY=... spikelm
# A hub id resolves from a mounted Hugging Face cache (nothing is downloaded: HF_HUB_OFFLINE=1 below) ...
#   docker run --rm -p 8000:8000 -v ~/.cache/huggingface:/hf -e SPIKELM_MODEL=ORG/NAME spikelm
# ... or, when you allow it, online: add -e HF_HUB_OFFLINE=0 (and -e HF_TOKEN=... for a private repository).
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    HF_HUB_OFFLINE=1 \
    HF_HOME=/hf \
    SPIKELM_MODEL=/app/runs/quickstart \
    SPIKELM_PORT=8000

WORKDIR /app

# A C compiler: on the CPU spikelm builds its small kernels (a neuron population's time steps, spike-fed matmuls,
# the attention decode step) on first use, in under a second; without one it runs slower PyTorch paths.
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev && rm -rf /var/lib/apt/lists/*

# torch first, pinned, so that installing the package leaves it as it is.
# The CPU-only wheel by default (PyPI's x86-64 wheel is a multi-GB CUDA build); --build-arg TORCH_INDEX_URL=
# (empty) takes PyPI's instead.
ARG TORCH_INDEX_URL="https://download.pytorch.org/whl/cpu"
RUN pip install torch==2.13.0 ${TORCH_INDEX_URL:+--index-url "$TORCH_INDEX_URL"}

# dependencies before the source, so that a code change does not reinstall them
COPY pyproject.toml README.md ./
COPY spikelm ./spikelm
COPY serve ./serve
RUN pip install ".[serve]"

RUN useradd --create-home --uid 10001 spikelm && mkdir -p /app/runs /hf && chown spikelm /app/runs /hf
USER spikelm

EXPOSE 8000
# Inside a container the server must listen on all interfaces for -p to reach it.
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s \
    CMD python -c "import os, urllib.request; urllib.request.urlopen(f'http://127.0.0.1:{os.environ[\"SPIKELM_PORT\"]}/health', timeout=4)"
# serve/entrypoint.sh reads SPIKELM_MODEL and SPIKELM_PORT at run time; arguments after the image name go
# to `spikelm serve` (docker run ... spikelm --max-batch 16).
ENTRYPOINT ["/app/serve/entrypoint.sh"]
