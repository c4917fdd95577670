"""Worked examples built on the client library; ``daily_totals`` is the change feed's projection
(docs/feed.md, "A projection")."""
