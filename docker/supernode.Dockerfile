# GPU SuperNode for FedDM: Flower's official image plus CUDA-enabled torch and the
# app's dependencies; the ClientApp runs as a subprocess of the SuperNode and uses
# the GPU when the container gets one (node config device='cuda' or 'auto').
# Build from the repository root:  docker build -f docker/supernode.Dockerfile -t feddm-supernode .
FROM flwr/supernode:1.42.0

WORKDIR /app
COPY --chown=app:app pyproject.toml README.md constraints.txt ./
COPY --chown=app:app models ./models
COPY --chown=app:app client_app ./client_app
COPY --chown=app:app server_app ./server_app
COPY --chown=app:app strategies ./strategies
COPY --chown=app:app conf ./conf
COPY --chown=app:app feddm ./feddm
# PyPI's Linux torch wheels are CUDA builds; the NVIDIA container runtime supplies the driver.
RUN sed -i 's/.*flwr\[simulation\].*//' pyproject.toml \
    && python -m pip install --no-cache-dir -c constraints.txt .

ENTRYPOINT ["flower-supernode"]
