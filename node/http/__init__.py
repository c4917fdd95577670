"""The HTTP side of a node: the public API (API.md) and the internal listener, each on its own port.

The node process (``raftledger.node.runtime``) builds a ``NodeContext`` with its hosted
``ShardService`` replicas, every node's public and internal base URLs, the sealer of the internal
protocol and a ``Metrics`` object it also hands to the Raft glue; ``create_app(ctx)`` and
``internal.create_app(ctx)`` are the two applications, ``await start(ctx, host, port,
internal_port)`` serves both from the running (uvloop) event loop.
"""

from .app import ROUTES, create_app, install, new_event_loop, start
from .context import NodeContext

__all__ = ["ROUTES", "NodeContext", "create_app", "install", "new_event_loop", "start"]
