# ierf service image: the engine, the Serve app, the SDK (with its generated stubs) and the bundled
# EfficientNet-Lite0 weights. Nothing is downloaded at run time.
#
#   docker build -t ierf:0.1.0 .                                   # CPU torch
#   docker build --build-arg TORCH_INDEX=https://download.pytorch.org/whl/cu128 -t ierf:0.1.0-gpu .
#   docker run --rm --shm-size=1g -p 9000:9000 -p 8000:8000 -p 8080:8080 ierf:0.1.0 \
#       python -m ierf.serving serve --http-host 0.0.0.0 --redis-url redis://redis-host:6379/0
#
# The same image runs under KubeRay (deploy/k8s/rayservice.yaml): KubeRay starts Ray itself and
# deploys `ierf.serving.app:build_app` from serveConfigV2; its probes need wget.
FROM python:3.11-slim-bookworm

ARG TORCH_INDEX=https://download.pytorch.org/whl/cpu
ENV PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1 \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    RAY_USAGE_STATS_ENABLED=0 \
    # ingress->worker payloads (decoded images, maps) travel inline instead of via the object store
    RAY_max_direct_call_object_size=4194304 \
    # Serve's gRPC proxy refuses messages over 40 MiB, both ways (Ray's default: 2 GiB): the 32 MiB
    # image cap plus room. Raise it with ingress.max_image_bytes (`ierf.serving serve` refuses less).
    RAY_SERVE_GRPC_MAX_MESSAGE_SIZE=41943040 \
    # settings.PROCESS_ENV: glibc keeps request-sized buffers mapped between requests (a warm Explain
    # of a 720 KB image paid ~1,500 page faults in the proxy and the ingress), and OpenMP threads spin
    # ~0.7 ms instead of ~7 ms after the worker's last parallel region before they sleep
    MALLOC_MMAP_THRESHOLD_=33554432 \
    MALLOC_TRIM_THRESHOLD_=268435456 \
    GOMP_SPINCOUNT=30000

RUN apt-get update \
    && apt-get install -y --no-install-recommends wget \
    && rm -rf /var/lib/apt/lists/* \
    && useradd --create-home --uid 1000 ray

WORKDIR /app
# torch first, pinned, from the chosen index: an open resolve pulls a multi-GB CUDA build.
RUN pip install --index-url "$TORCH_INDEX" torch==2.14.1 torchvision==0.29.1

COPY pyproject.toml README.md ./
COPY service ./service
COPY clients ./clients
COPY protos ./protos
RUN pip install '.[serve]' ./clients/python \
    # the committed stubs must match the .proto they ship with
    && python protos/generate.py --check \
    && python -c "import ierf.serving.app, ierf_client; from ierf.models import load_model; load_model('efficientnet_lite0')"

USER 1000
EXPOSE 9000 8000 8080
HEALTHCHECK --interval=30s --timeout=5s --start-period=180s \
    CMD wget -q -O /dev/null http://127.0.0.1:8000/-/healthz || exit 1
CMD ["python", "-m", "ierf.serving", "serve", "--http-host", "0.0.0.0", "--redis-url", ""]
