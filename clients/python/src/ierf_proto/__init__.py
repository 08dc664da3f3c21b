"""Generated protobuf/gRPC modules of the ierf API (package ierf.v1); see protos/."""
