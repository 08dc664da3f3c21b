"""ierf.serving: the gRPC service (Ray Serve), its Redis-backed cache and metrics.

The only part of ``ierf`` that imports ray, grpc or redis. Entry points:

- ``ierf.serving.app:build_app``: the Serve application (config files, KubeRay);
- ``python -m ierf.serving``: run Redis-backed service locally (``make run``) and stop it.

Importing this package is cheap; submodules pull in Ray only where needed.
"""
