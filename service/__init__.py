"""The lateflow HTTP retrieval service (FastAPI + uvicorn) over one in-process loaded index.

Modules, one job each: :mod:`service.app` (the app factory and endpoints), :mod:`service.holder`
(the atomically swappable current index and the manifest watcher), :mod:`service.models` (request
and response models), :mod:`service.limits` (request limits), :mod:`service.auth` (bearer token),
:mod:`service.errors` (the JSON error shape), :mod:`service.server` (running it with uvicorn).
Start it with ``lateflow serve --index DIR``; see the README for the endpoints.
"""
