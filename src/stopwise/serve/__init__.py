"""HTTP serving for stopwise models: `stopwise serve encoder` (dynamic batching, bounded queue).

Importing this package imports neither torch nor FastAPI. :mod:`stopwise.serve.app` builds the
encoder app (``create_app``), :mod:`stopwise.serve.batcher` the dynamic batcher,
:mod:`stopwise.serve.metrics`
the Prometheus text (the body limit it shares with the chat server is :mod:`stopwise.http.limits`) and :mod:`stopwise.serve.runner` uvicorn with a bounded graceful shutdown.
"""

from __future__ import annotations
