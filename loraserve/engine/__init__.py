"""The multi-LoRA inference engine. Knows nothing of HTTP; the API layer never imports it.

Importing this package imports nothing: `engine.core` (requests, KV blocks, scheduling, adapter slots)
is pure Python and imports without torch. `engine.loader.load_backend(source)` is the one entry point
the server uses: it loads a model and returns an `AsyncEngine` (the `loraserve.types.Backend` protocol).
"""
