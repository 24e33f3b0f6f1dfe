# DLRM on TorchServe, CPU image. First version: builds the default archive at
# image build time and serves it. See README "Deploy" for the container settings.
ARG BASE_IMAGE=debian:bookworm-slim
FROM ${BASE_IMAGE}

ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
RUN apt-get update \
    && apt-get install -y --no-install-recommends python3 python3-venv openjdk-17-jre-headless \
    && rm -rf /var/lib/apt/lists/*

RUN useradd --create-home --uid 1000 model-server
WORKDIR /home/model-server/app
COPY requirements.txt requirements-torchrec.txt ./
RUN python3 -m venv /opt/venv \
    && /opt/venv/bin/pip install --no-cache-dir --extra-index-url "${TORCH_INDEX_URL}" -r requirements.txt \
    && /opt/venv/bin/pip install --no-cache-dir --no-deps -r requirements-torchrec.txt
ENV PATH=/opt/venv/bin:$PATH

COPY handler handler
COPY model_factory model_factory
COPY build_mar.py config.properties ./
RUN mkdir -p model_store && python build_mar.py && chown -R model-server model_store

USER model-server
# Only the inference API leaves the container; management and metrics stay on loopback.
ENV TS_INFERENCE_ADDRESS=http://0.0.0.0:8080
EXPOSE 8080
HEALTHCHECK --interval=10s --timeout=3s --start-period=60s CMD python3 -c "import urllib.request,sys; sys.exit(urllib.request.urlopen('http://127.0.0.1:8080/ping').status != 200)"
CMD ["torchserve", "--start", "--foreground", "--ncs", "--model-store", "model_store", "--models", "dlrm=dlrm.mar", "--ts-config", "config.properties"]
