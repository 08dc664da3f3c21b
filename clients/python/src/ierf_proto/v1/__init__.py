"""ierf.v1: generated from protos/ierf_proto/v1/explainer.proto by protos/generate.py."""
