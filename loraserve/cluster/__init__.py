"""loraserve as a Ray Serve application: one gateway deployment (the FastAPI app) in front of engine
replicas (one AsyncEngine each), a finetune's requests routed by Serve's model multiplexing to the replicas
that hold its adapter, a session's (`x-session-affinity`) to one replica, where its prefix is cached.

Needs the `cluster` extra (`pip install 'loraserve[cluster]'`: ray[serve]). Modules, one concept each:
`config` (what an application is built from), `protocol` (what an engine replica streams back),
`engine` (the engine deployment), `adapters` (adapter files fetched from the store by the replicas),
`replica_cache` (their machine's cache of them, kept to a byte budget),
`backend` (the gateway's Backend over it), `remote_events` (one request's stream from a replica, sent
again when the replica dies before streaming anything), `router` (which engine replica a gateway sends a
request to: a session's to one replica), `loads` (the replicas' gauges, polled), `replica_header` (the
x-loraserve-replica and x-loraserve-gateway response headers), `gateway` (the ingress deployment), `app`
(the application builder that `serve run` / `serve deploy` name) and `local` (`loraserve serve
--replicas N`, `--gateways M`).

Only `engine` loads torch, and only inside its replicas.
"""
