"""loraserve as a Ray Serve application: one gateway deployment (the FastAPI app) in front of engine
replicas (one AsyncEngine each), a finetune's requests routed by Serve's model multiplexing to the replicas
that hold its adapter.

Needs the `cluster` extra (`pip install 'loraserve[cluster]'`: ray[serve]). Modules, one concept each:
`config` (what an application is built from), `protocol` (what an engine replica streams back),
`engine` (the engine deployment), `backend` (the gateway's Backend over it), `loads` (the replicas'
gauges, polled), `replica_header` (the x-loraserve-replica response header), `gateway` (the ingress
deployment), `app` (the application builder that `serve run` / `serve deploy` name) and `local`
(`loraserve serve --replicas N`).

Only `engine` loads torch, and only inside its replicas.
"""
