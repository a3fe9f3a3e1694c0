# trec-rank runtime image for kubernetes/slurm (TorchX `--image`). CUDA by default:
#   docker build -t REGISTRY/trec-rank:0.1.0 . && docker push REGISTRY/trec-rank:0.1.0
#   docker build --build-arg VARIANT=cpu -t trec-rank:cpu .   # CPU-only image
# The PyPI CUDA wheels (torch 2.13, fbgemm-gpu 1.8) bundle CUDA 13 libraries: the nodes need an NVIDIA
# driver >= 580 and the NVIDIA container runtime. Data and runs are not in the image: mount them
# (components' --mounts). docs/cluster.md has the whole path.
FROM python:3.11-slim

ARG VARIANT=cuda
ENV TREC_RANK_VARIANT=${VARIANT} \
    PYTHONUNBUFFERED=1 \
    OMP_NUM_THREADS=1

RUN apt-get update && apt-get install -y --no-install-recommends make && rm -rf /var/lib/apt/lists/*
WORKDIR /workspace

# Dependencies first (cached across code changes): bootstrap needs only these files. It ends with
# scripts/check_install.py, so an image whose torch does not match its fbgemm-gpu does not build.
COPY pyproject.toml README.md ./
COPY scripts/bootstrap.sh scripts/check_install.py scripts/
COPY trec_rank/__init__.py trec_rank/__init__.py
RUN bash scripts/bootstrap.sh

COPY . .
# The build machine has no GPU driver: the check reads fbgemm-gpu's build instead of importing it,
# and `trec-rank --help` must work without one (the CLI imports torchrec only for commands that need it).
RUN .venv/bin/python -m pip install --no-deps -q -e . && bash scripts/bootstrap.sh \
    && .venv/bin/python scripts/check_install.py "$TREC_RANK_VARIANT" \
    && .venv/bin/trec-rank --help > /dev/null
ENV PATH=/workspace/.venv/bin:${PATH}

ENTRYPOINT []
CMD ["trec-rank", "--help"]
