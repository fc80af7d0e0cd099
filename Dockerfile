# diffguard on the official Ray image: the same image runs the RayService (endpoint) and the RayJob (scans).
#   docker build -t REGISTRY/diffguard:0.1.0 .                                   (GPU, CUDA build of torch)
#   docker build -t diffguard:dev --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311 \
#       --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu .       (CPU, for kind/minikube)
# The Ray version must equal the `ray` pin in pyproject.toml and `rayVersion` in k8s/ (tests/unit/test_k8s.py).
# Model weights are not baked in: the pods' `model-cache` init container fills the model cache volume (HF_HOME).
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-gpu
FROM ${BASE_IMAGE}

# torch first (its own index: CUDA wheels by default, the CPU index for dev), then the project.
ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128

# The image's non-root user (uid 1000, group users) owns its Python environment: no root needed to install.
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

# Hub models are read from (and cached in) HF_HOME, the mount point of the model cache volume in k8s/.
ENV HF_HOME=/home/ray/models/huggingface \
    PYTHONUNBUFFERED=1
