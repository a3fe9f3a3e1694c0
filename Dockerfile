# trec-rank runtime image for kubernetes/slurm (TorchX `--image`). CUDA by default:
#   docker build -t trec-rank:0.1.0 .                       # CUDA (PyPI torch/fbgemm-gpu wheels carry CUDA)
#   docker build --build-arg VARIANT=cpu -t trec-rank:cpu .  # CPU-only image
# The PyPI CUDA wheels bundle their CUDA libraries; the host needs an NVIDIA driver and container runtime.
FROM python:3.11-slim

ARG VARIANT=cuda
ENV TREC_RANK_VARIANT=${VARIANT} \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1

RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace

# Dependencies first (cached across code changes): bootstrap needs only these files.
COPY pyproject.toml README.md ./
COPY scripts/bootstrap.sh scripts/bootstrap.sh
COPY trec_rank/__init__.py trec_rank/__init__.py
RUN bash scripts/bootstrap.sh

COPY . .
RUN .venv/bin/python -m pip install --no-deps -q -e . && bash scripts/bootstrap.sh
ENV PATH=/workspace/.venv/bin:${PATH}

ENTRYPOINT []
CMD ["trec-rank", "--help"]
