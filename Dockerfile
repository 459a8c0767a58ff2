# infergate gateway image: multi-stage, non-root, with a healthcheck on the admin port.
#   docker build -t infergate .
#   docker run -p 9000:9000 -p 9001:9001 -p 9002:9002 -v $PWD/configs:/etc/infergate infergate
FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY gateway ./gateway
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --create-home --uid 10001 infergate
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir /wheels/*.whl && rm -rf /wheels
# compile the drift kernels into numba's on-disk cache now, so workers start without a JIT pause
RUN python -c "from gateway.drift.kernels import warm_up; warm_up()"
COPY configs /etc/infergate
USER infergate
EXPOSE 9000 9001 9002
HEALTHCHECK --interval=10s --timeout=2s --start-period=10s \
  CMD python -c "import urllib.request; urllib.request.urlopen('http://127.0.0.1:9002/ready', timeout=1)"
STOPSIGNAL SIGTERM
ENTRYPOINT ["infergate"]
CMD ["serve", "--config", "/etc/infergate/gateway.yaml"]
