# The image of prefect.yaml's Docker and Kubernetes work pools (deployments full-docker and
# full-kubernetes): this repository at /opt/moe-tuning, where those deployments' pull step looks for
# it, with the locked environment and the CUDA build of torch, set up by the Makefile's own steps
# (`make setup`: pip from the lock, torch, the lock with hashes, checks). Not built in CI here.
#
#   docker build -t "$MOE_TUNING_IMAGE" .          # from the repository root; then push it
#   docker build --build-arg EXTRA_PIP="deepspeed" -t "$MOE_TUNING_IMAGE" .
#
# The host needs only the NVIDIA driver and container toolkit: the CUDA runtime comes with the torch
# wheels. trainer=deepspeed_stage_2 (the paper recipes' default) needs DeepSpeed (EXTRA_PIP) and, for
# its compiled optimizer ops, a CUDA toolkit: use a CUDA devel image with Python 3.11 as BASE_IMAGE,
# or trainer=ddp / fsdp, which need nothing more. Runs write run_dir and mlflow.db inside the
# container: mount a volume there, or point MLFLOW_TRACKING_URI at the team's server.
ARG BASE_IMAGE=python:3.11-slim-bookworm
FROM ${BASE_IMAGE}

ARG TORCH_SPEC="torch==2.13.0 --index-url https://download.pytorch.org/whl/cu128"
ARG EXTRA_PIP=""
ENV DO_NOT_TRACK=true \
    MLFLOW_DISABLE_TELEMETRY=true \
    PREFECT_SERVER_ANALYTICS_ENABLED=false \
    DVC_NO_ANALYTICS=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PREFECT_LOGGING_EXTRA_LOGGERS=lightning.pytorch

# git: DVC runs the pipeline in the repository (and runs record git_commit); make: the set-up
RUN apt-get update \
    && apt-get install -y --no-install-recommends git make \
    && rm -rf /var/lib/apt/lists/*

WORKDIR /opt/moe-tuning
# What the environment is built from first, so that a code change reuses the environment layer.
COPY Makefile pyproject.toml requirements.lock README.md ./
COPY tools/ tools/
COPY src/ src/
RUN make setup TORCH_SPEC="$TORCH_SPEC" \
    && if [ -n "$EXTRA_PIP" ]; then .venv/bin/python -m pip install $EXTRA_PIP; fi

# The whole checkout, .git and .dvc included (dvc.yaml runs in it); .dockerignore leaves out the
# environment, generated state and data.
COPY . .
ENV PATH=/opt/moe-tuning/.venv/bin:$PATH
CMD ["python", "-m", "moe_llava.cli", "--help"]
