# One raftledger node. Configure it with a TOML file (see cluster/compose/*.toml) mounted at /etc/raftledger.
# The build stage compiles the state machine with mypyc (see setup.py); the image keeps only the wheel.
FROM python:3.11-slim AS build
RUN apt-get update && apt-get install -y --no-install-recommends gcc libc6-dev \
    && rm -rf /var/lib/apt/lists/*
WORKDIR /src
COPY pyproject.toml setup.py README.md ./
COPY statemachine/ statemachine/
COPY node/ node/
COPY cluster/ cluster/
COPY client/ client/
COPY bench/ bench/
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
    && python -c "import raftledger.statemachine as s; assert s.COMPILED" \
    && useradd --system --uid 10001 --home /data raftledger && mkdir -p /data && chown raftledger /data

USER raftledger
VOLUME ["/data"]
EXPOSE 8080 7000 9000 9001 9100
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=2s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
ENTRYPOINT ["raftledger", "node"]
CMD ["--config", "/etc/raftledger/node.toml"]
