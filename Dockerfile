# harvest in one container: CUDA runtime, Python, torch (CUDA wheel), harvest and a
# redis-server >= 6.2 for the embedded job queue. Not built in CI. See docs/DEPLOY.md.
#
#   docker build -t harvest:0.1.0 .
#   docker run --gpus all --shm-size 8g -p 8000:8000 -e HARVEST_API_KEY=... \
#     -v harvest-data:/var/lib/harvest -v hf-cache:/root/.cache/huggingface harvest:0.1.0
ARG CUDA_IMAGE=nvidia/cuda:12.8.1-runtime-ubuntu24.04

FROM ${CUDA_IMAGE} AS base
# Ubuntu 24.04's own redis-server is 7.0 (the queue needs >= 6.2) and its Python 3.12
RUN apt-get update -qq \
 && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq --no-install-recommends \
      python3 python3-venv redis-server ca-certificates tini \
 && rm -rf /var/lib/apt/lists/* \
 && redis-server --version \
 && python3 -m venv /opt/harvest
ENV PATH=/opt/harvest/bin:$PATH \
    PIP_NO_CACHE_DIR=1 \
    PYTHONUNBUFFERED=1

FROM base AS wheel
WORKDIR /src
COPY . .
RUN pip wheel -q --no-deps -w /dist .

FROM base
# the versions harvest is tested with; PyPI's torch wheel for Linux carries its CUDA libraries
ARG TORCH_VERSION=2.13.0
ARG RAY_VERSION=2.60.0
COPY --from=wheel /dist/*.whl /tmp/
RUN pip install -q "torch==${TORCH_VERSION}" "ray[serve]==${RAY_VERSION}" /tmp/harvest-*.whl \
 && rm /tmp/harvest-*.whl \
 && harvest --help >/dev/null
COPY scripts/docker/harvest.yaml /etc/harvest.yaml
COPY scripts/docker/entrypoint.sh /usr/local/bin/harvest-entrypoint
# the embedded Redis's data and password, and the demo model if one is built
ENV HARVEST_HOME=/var/lib/harvest
VOLUME /var/lib/harvest
EXPOSE 8000
ENTRYPOINT ["tini", "--", "harvest-entrypoint"]
CMD ["harvest", "up", "--host", "0.0.0.0", "--config", "/etc/harvest.yaml"]
