"""The HTTP API of a node (API.md): ``create_app(NodeContext(...))``, ``await start(ctx, host, port)``,
or ``mount_api(app, runtime)`` onto the node process's own application.

The node process builds a ``NodeContext`` with its hosted ``ShardService`` replicas, the HTTP base URL
of every node (for forwarding writes to a shard's leader) and a ``Metrics`` object it also hands to the
Raft glue, then serves on a uvloop event loop (``new_event_loop()``).
"""

from .app import ROUTES, create_app, install, mount_api, new_event_loop, start
from .context import Limits, NodeContext

__all__ = ["ROUTES", "Limits", "NodeContext", "create_app", "install", "mount_api", "new_event_loop",
           "start"]
