"""What each shard leader does with the change feed besides serving it (``node/http/feed.py``):

- ``retention``: proposes ``CompactFeed`` once the oldest events are old enough and every durable
  consumer has passed them;
- ``exporter``: delivers every event, at least once and in offset order, to the configured sinks
  (``sinks``: NATS JetStream, signed webhooks), resuming from its own replicated consumer offset after
  a leader change; a webhook batch that keeps failing goes to the dead-letter store (``dead_letters``).

``background(ctx)`` runs them while the node serves its API.
"""

# node.feed builds on node.http, whose package imports the routes, which import node.feed: loading
# node.http first makes every import order work.
from .. import http as _http  # noqa: E402, F401
