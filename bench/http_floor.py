"""The HTTP floor: what single-transfer requests cost on this machine with no ledger behind them.

Starts two bare aiohttp servers on uvloop, one process each like the two shard leaders of
``raftledger up``. Their ``POST /v1/transactions`` decodes the JSON body and answers 201 with a body
the size of a real transaction. The load generator's own client drives them (closed loop), and the
servers' CPU per request is reported the way ``loadgen --cluster-file`` reports the nodes'. Single
transfers through a replicated ledger cannot go faster than this on the same machine.

    python -m raftledger.bench.http_floor --connections 64 --duration 15
"""

from __future__ import annotations

import argparse
import json
import socket
import subprocess
import sys
import time

import orjson
from aiohttp import web
from raftledger.bench import loadgen

servers = 2
port_base_default = 18380
listen_deadline_s = 20.0
listen_poll_s = 0.05
# A transaction as the API renders it: the answer carries about this much JSON.
ANSWER = orjson.dumps({
    "id": "lg-t000000", "status": "posted", "code": "", "metadata": {}, "timestamp": 0,
    "entries": [{"account_id": f"lg-{n}:{{g000}}", "direction": d, "amount": 1, "currency": "USD",
                 "seq": 1, "hash": "0" * 64} for n, d in ((0, "debit"), (1, "credit"))],
    "pending": False, "timeout_seconds": 0, "expires_at": None, "pending_id": None,
    "reverses": None, "reversed_by": None, "resolved_by": None, "shards": [0]})


async def transaction(request: web.Request) -> web.Response:
    json.loads(await request.read())
    return web.Response(status=201, body=ANSWER, content_type="application/json")


async def accounts(request: web.Request) -> web.Response:
    await request.read()
    return web.Response(body=b'{"results":[]}', content_type="application/json")


def serve(port: int) -> None:
    import uvloop

    app = web.Application()
    app.add_routes([web.post("/v1/transactions", transaction), web.post("/v1/accounts", accounts)])
    web.run_app(app, host="127.0.0.1", port=port, print=None, loop=uvloop.new_event_loop())


def _wait_listening(port: int) -> None:
    deadline = time.monotonic() + listen_deadline_s
    while time.monotonic() < deadline:
        try:
            socket.create_connection(("127.0.0.1", port), timeout=1).close()
            return
        except OSError:
            time.sleep(listen_poll_s)  # poll until the server listens
    raise SystemExit(f"no server on port {port} after {listen_deadline_s}s")


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--connections", type=int, default=64)
    parser.add_argument("--duration", type=float, default=15.0)
    parser.add_argument("--warmup", type=float, default=2.0)
    parser.add_argument("--port-base", type=int, default=port_base_default)
    parser.add_argument("--serve", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.serve:
        serve(args.serve)
        return
    ports = [args.port_base + i for i in range(servers)]
    procs = [subprocess.Popen([sys.executable, "-m", "raftledger.bench.http_floor", "--serve",
                               str(p)]) for p in ports]
    try:
        for port in ports:
            _wait_listening(port)
        urls = ",".join(f"http://127.0.0.1:{p}" for p in ports)
        load_args = loadgen.parse_args(["--url", urls, "--mode", "single",
                                        "--connections", str(args.connections),
                                        "--duration", str(args.duration),
                                        "--warmup", str(args.warmup)])
        result = loadgen.execute(load_args, pids=[p.pid for p in procs])
    finally:
        for proc in procs:
            proc.terminate()
        for proc in procs:
            proc.wait()
    result["server_cpu_us_per_request"] = result.pop("node_cpu_us_per_transfer")
    json.dump(result, sys.stdout)
    sys.stdout.write("\n")


if __name__ == "__main__":
    main()
