# Two images from one file (docs/operations.md#images):
#   docker build -t infergate .                                   # the gateway (the last stage, so the default)
#   docker build --target triton-cpu -t infergate-triton-cpu .    # Triton on CPU with models/, for local use
#   docker run -p 9000:9000 -p 9001:9001 -p 9002:9002 -v $PWD/configs:/etc/infergate infergate
#   docker run --shm-size=256m -p 8000:8000 -p 8001:8001 -p 8002:8002 infergate-triton-cpu
# Both run as non-root users with a healthcheck. tests/unit/test_deploy.py parses this file and holds
# the stages, users, ports and paths to what deploy/ expects.

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

# Triton Inference Server 2.51 on CPU, from the nvidia-pytriton wheel, installed by the project's own
# scripts/triton-cpu.sh (one recipe for laptops, CI and this image). Only the python backend is in
# the wheel, which is what models/ uses. For GPUs use NVIDIA's image (deploy/base/triton.yaml).
FROM python:3.11-slim AS triton-cpu
# uid 1000 as in NVIDIA's tritonserver image (user triton-server), so one securityContext fits both
RUN useradd --create-home --uid 1000 triton-server
COPY scripts/triton-cpu.sh scripts/daemon.sh /opt/infergate/scripts/
# /opt/tritonserver/backends is tritonserver's default --backend-directory, as in NVIDIA's image
RUN TRITON_HOME=/opt/tritonserver TRITON_VENV=/opt/triton-venv PYTHON=python3.11 \
      /opt/infergate/scripts/triton-cpu.sh install \
 && mkdir -p /opt/tritonserver/bin \
 && ln -s /opt/triton-venv/lib/python3.11/site-packages/pytriton/tritonserver/bin/tritonserver /opt/tritonserver/bin/ \
 && test "$(/opt/triton-venv/bin/python -c 'import sysconfig; print(sysconfig.get_config_var("LIBDIR"))')" = /usr/local/lib
# The wheel's two traps (scripts/triton-cpu.sh): the venv's own libpython first on LD_LIBRARY_PATH
# (the RUN above checks it is /usr/local/lib), then the wheel's libs; the server venv's bin/ first
# on PATH, so the python-backend stub finds numpy<2.
ENV LD_LIBRARY_PATH=/usr/local/lib:/opt/triton-venv/lib/python3.11/site-packages/nvidia_pytriton.libs \
    PATH=/opt/triton-venv/bin:/opt/tritonserver/bin:$PATH \
    PYTHONDONTWRITEBYTECODE=1
COPY models /models
RUN find /models -name __pycache__ -prune -exec rm -rf {} +
USER triton-server
EXPOSE 8000 8001 8002
HEALTHCHECK --interval=10s --timeout=2s --start-period=20s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:8000/v2/health/ready', timeout=1)"
ENTRYPOINT ["tritonserver", "--allow-gpu-metrics=false"]
CMD ["--model-repository=/models"]

# The gateway (default target).
FROM python:3.11-slim AS gateway
RUN useradd --create-home --uid 10001 infergate
# numba caches compiled kernels only in a directory it can write; the runtime user owns this one
# (Kubernetes mounts an emptyDir here and seeds it from the image: deploy/base/gateway.yaml)
ENV NUMBA_CACHE_DIR=/var/cache/infergate/numba \
    PYTHONDONTWRITEBYTECODE=1
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels \
 && mkdir -p $NUMBA_CACHE_DIR && chown infergate:infergate $NUMBA_CACHE_DIR
COPY configs /etc/infergate
USER infergate
# compile the drift kernels into numba's on-disk cache now, so workers start without a JIT pause
RUN python -c "from gateway.drift.kernels import warm_up; warm_up()"
EXPOSE 9000 9001 9002
HEALTHCHECK --interval=10s --timeout=2s --start-period=10s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9002/ready', timeout=1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["infergate"]
CMD ["serve", "--config", "/etc/infergate/gateway.yaml"]
