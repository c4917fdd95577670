"""The chaos and failover harness (``raftledger chaos``; docs/reliability.md).

A real local cluster whose every node-to-node link runs through a proxy of the harness
(``proxy``, ``nemesis.Network``), bounded workloads that record a Jepsen-style history
(``workload``, ``history``), faults planned from a seed (``nemesis``), checkers over the history
and the final state (``checkers``), and the report (``report``); ``runner`` ties them together:
``runner.run(runner.Options(duration_s=60, seed=7))``.
Nothing is imported here, so the ``raftledger`` command stays light for the nodes it starts.
"""
