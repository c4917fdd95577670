# One raftledger node. Configure it with a TOML file (see cluster/compose/*.toml) mounted at /etc/raftledger.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1
WORKDIR /src
COPY pyproject.toml README.md ./
COPY statemachine/ statemachine/
COPY node/ node/
COPY cluster/ cluster/
COPY client/ client/
COPY bench/ bench/
RUN pip install --no-cache-dir . && useradd --system --home /data raftledger \
    && mkdir -p /data && chown raftledger /data

USER raftledger
VOLUME ["/data"]
EXPOSE 8080 9000 9001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=5s --timeout=2s --retries=3 \
    CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8080/healthz', timeout=2)"
ENTRYPOINT ["raftledger", "node"]
CMD ["--config", "/etc/raftledger/node.toml"]
