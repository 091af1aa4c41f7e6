"""`loraserve bench-routing` (GitHub issue 19): adapter loads and TTFT of multiplexed (adapter-affinity)
routing against Ray Serve's plain power-of-two routing on a real local Ray, and a simulation that turns
the measured per-replica figures into replicas needed for many more adapters.

Modules: `popularity` (which adapter a request names), `simulate` (the replica-count simulation, pure
Python), `cluster` (the local Ray application and its /metrics), `drive` (the HTTP clients), `report`
(the tables) and `run` (the command).
"""
