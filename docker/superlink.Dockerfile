# SuperLink for FedDM: Flower's official image plus the app's dependencies, so the
# ServerApp runs as a subprocess of the SuperLink (isolation "subprocess").
# Build from the repository root:  docker build -f docker/superlink.Dockerfile -t feddm-superlink .
FROM flwr/superlink:1.42.0

WORKDIR /app
COPY --chown=app:app pyproject.toml README.md constraints.txt ./
COPY --chown=app:app models ./models
COPY --chown=app:app client_app ./client_app
COPY --chown=app:app server_app ./server_app
COPY --chown=app:app strategies ./strategies
COPY --chown=app:app conf ./conf
COPY --chown=app:app feddm ./feddm
# The image already has flwr; keep it, install the rest (torch and friends).
RUN sed -i 's/.*flwr\[simulation\].*//' pyproject.toml \
    && python -m pip install --no-cache-dir -c constraints.txt . \
    && mkdir -p /app/state /app/outputs

ENTRYPOINT ["flower-superlink"]
