# DLRM on TorchServe. Build the model archive on the host first, then the image:
#
#   python build_mar.py                                   # -> model_store/dlrm.mar
#   podman build --format docker -t dlrm-torchserve .     # or: docker build -t dlrm-torchserve .
#
# Build arguments:
#   BASE_IMAGE       Debian bookworm with Python 3.11 (default debian:bookworm-slim)
#   VARIANT          cpu (default) or gpu (CUDA torch and fbgemm-gpu from requirements-gpu.txt)
#   TORCH_INDEX_URL  where the CPU torch wheel comes from (default: the PyTorch CPU index)
#   TORCH_WHEELS     a pip --find-links location with the torch wheel, used instead of
#                    TORCH_INDEX_URL: a directory mounted into the build
#                    (podman build -v /opt/wheels:/wheels:ro --build-arg TORCH_WHEELS=/wheels)
#                    or a URL
#   PIP_CERT         CA bundle for pip, for builds behind a TLS-inspecting proxy
#   MODEL_ARCHIVE    the archive to serve, relative to the build context (default model_store/dlrm.mar)
#
# Run-time settings (environment) are documented in deploy/container/entrypoint.py.
# `make test-container` builds this image, runs it and checks it from the host.

ARG BASE_IMAGE=debian:bookworm-slim

# Build stage: a virtual environment with the pinned requirements. Nothing else of
# this stage (pip, its cache, compilers should a wheel need one) reaches the image.
FROM ${BASE_IMAGE} AS build
RUN apt-get update \
    && apt-get install -y --no-install-recommends ca-certificates python3 python3-venv \
    && rm -rf /var/lib/apt/lists/*
ARG VARIANT=cpu
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG TORCH_WHEELS=
# pip reads PIP_CERT from the environment; empty, it keeps its default CA bundle.
ARG PIP_CERT=
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1
COPY requirements.txt requirements-torchrec.txt requirements-gpu.txt /tmp/requirements/
WORKDIR /tmp/requirements
# The gpu variant swaps the two CPU lines of requirements.txt (torch, fbgemm-gpu-cpu)
# for requirements-gpu.txt; every other pin is shared. torchrec comes last with
# --no-deps: its metadata asks for the CUDA fbgemm-gpu, which must not replace the CPU
# build. Then out go pip and what serving never uses (about 230 MB): C++ headers (the
# image has no compiler), torch's C++ test programs, the test suites of numpy, sympy,
# networkx and mpmath (not of every package: pyre_extensions imports its own "tests").
# The last line fails the build if torch is not the variant's build.
RUN set -eu; \
    case "$VARIANT" in \
        cpu) cp requirements.txt selected.txt; torch_source="--extra-index-url $TORCH_INDEX_URL" ;; \
        gpu) grep -v -E '^(torch|fbgemm-gpu-cpu)==' requirements.txt | cat - requirements-gpu.txt > selected.txt; \
             torch_source="" ;; \
        *) echo "VARIANT must be cpu or gpu, not '$VARIANT'" >&2; exit 1 ;; \
    esac; \
    if [ -n "$TORCH_WHEELS" ]; then torch_source="--find-links $TORCH_WHEELS"; fi; \
    python3 -m venv /opt/venv; \
    /opt/venv/bin/pip install $torch_source -r selected.txt; \
    /opt/venv/bin/pip install --no-deps -r requirements-torchrec.txt; \
    /opt/venv/bin/pip uninstall --yes pip; \
    site=/opt/venv/lib/python3.11/site-packages; \
    rm -rf "$site/torch/include" "$site/torch/test"; \
    find "$site/torch/bin" -mindepth 1 -maxdepth 1 ! -name torch_shm_manager -exec rm -rf {} +; \
    for package in numpy sympy networkx mpmath; do \
        find "$site/$package" -depth -type d -name tests -exec rm -rf {} +; \
    done; \
    /opt/venv/bin/python -c "import sys, torch, torchrec, fbgemm_gpu, ts; \
gpu = torch.version.cuda is not None; \
print('torch', torch.__version__, '| torchserve', ts.__version__); \
sys.exit(0 if gpu == ('$VARIANT' == 'gpu') else f'torch {torch.__version__} is not a $VARIANT build')"
# The TorchServe frontend agent (OIP model metadata and readiness), compiled against the installed
# TorchServe jar: the JDK stays in this stage, the image gets the jar. (Its postinst needs the man directory.)
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends openjdk-17-jdk-headless \
    && rm -rf /var/lib/apt/lists/*
COPY servers/frontend_agent.py /tmp/agent/servers/
COPY frontend_agent/src /tmp/agent/frontend_agent/src
RUN /opt/venv/bin/python /tmp/agent/servers/frontend_agent.py --output /opt/agent/dlrm-frontend-agent.jar

# Final stage: Python, a Java 17 runtime, the virtual environment, the settings and the
# archive. Root owns all of it; TorchServe runs as model-server and writes only its
# logs (in its home) and temporary files.
FROM ${BASE_IMAGE}
# The JRE's postinst links its man page into /usr/share/man/man1, which slim images lack.
RUN mkdir -p /usr/share/man/man1 \
    && apt-get update \
    && apt-get install -y --no-install-recommends python3 openjdk-17-jre-headless tini \
    && apt-get clean && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 --shell /usr/sbin/nologin model-server
COPY --from=build /opt/venv /opt/venv
ENV PATH=/opt/venv/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1 \
    OMP_WAIT_POLICY=PASSIVE \
    TS_CONFIG_FILE=/opt/dlrm/config.properties \
    TS_INFERENCE_ADDRESS=http://0.0.0.0:8080
COPY config.properties log4j2.xml /opt/dlrm/
COPY --from=build /opt/agent/dlrm-frontend-agent.jar /opt/dlrm/
# config.properties names log4j2.xml and the agent relative to the repository root; here they have fixed places.
# The JVM's heap is bounded by the container's memory limit: 12.5 % of it (256 MiB of the 2 GiB the
# Kubernetes Deployment and compose give a replica), the rest is for the Python workers, which hold the
# model. The frontend's live heap measured 45-60 MiB, and at most 182 MiB in use under 16 concurrent
# 2,000-row requests (docs/deploy.md). A frontend out of heap exits, so that the container restarts,
# instead of serving on with failing threads.
RUN sed -i -e 's|-Dlog4j.configurationFile=log4j2.xml|-Dlog4j.configurationFile=/opt/dlrm/log4j2.xml|' \
        -e 's|-javaagent:frontend_agent/build/dlrm-frontend-agent.jar|-javaagent:/opt/dlrm/dlrm-frontend-agent.jar|' \
        -e 's|^vmargs=|vmargs=-XX:MaxRAMPercentage=12.5 -XX:+ExitOnOutOfMemoryError |' \
        /opt/dlrm/config.properties \
    && grep -qx 'vmargs=-XX:MaxRAMPercentage=12.5 -XX:+ExitOnOutOfMemoryError -Dlog4j.configurationFile=/opt/dlrm/log4j2.xml -javaagent:/opt/dlrm/dlrm-frontend-agent.jar' \
        /opt/dlrm/config.properties
# The entry point reads the archive's settings with the handler's own ServingSettings (no torch needed);
# the Kubernetes startup probe runs `python -m rollout check` (the golden set) from /opt/dlrm, which
# needs the packages that it imports. TorchServe's workers import their own copies from the archive.
COPY deploy/container/entrypoint.py /opt/dlrm/entrypoint.py
COPY handler /opt/dlrm/handler
COPY model_factory /opt/dlrm/model_factory
COPY model_archive /opt/dlrm/model_archive
COPY rollout /opt/dlrm/rollout
COPY servers /opt/dlrm/servers
# The same image runs training (deploy/k8s/training/): `torchrun -m training.train` from /opt/dlrm.
COPY training /opt/dlrm/training
ARG MODEL_ARCHIVE=model_store/dlrm.mar
RUN --mount=type=bind,target=/context \
    if [ ! -f "/context/$MODEL_ARCHIVE" ]; then \
        echo "No model archive at '$MODEL_ARCHIVE' in the build context: run 'python build_mar.py' first," \
             "or pass --build-arg MODEL_ARCHIVE=<path of a .mar in the context>." >&2; \
        exit 1; \
    fi \
    && install -D --mode=0644 "/context/$MODEL_ARCHIVE" /opt/dlrm/model_store/dlrm.mar

USER model-server
WORKDIR /home/model-server
# Inference only: management (8081) and metrics (8082) stay on the container's loopback.
EXPOSE 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=60s --retries=3 \
    CMD ["python", "-c", "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/ping', timeout=4)"]
# tini forwards SIGTERM to TorchServe's whole process group (launcher, Java frontend,
# Python workers), so `docker stop` shuts it down at once instead of after the timeout.
ENTRYPOINT ["tini", "-g", "--", "python", "/opt/dlrm/entrypoint.py"]
