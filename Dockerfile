# ratelimitd: the gRPC server (50051) and Prometheus metrics (9464) on its embedded Valkey (data in /data), or on
# your Redis/Valkey with RATELIMITD_REDIS_URL. The same steps run without
# Docker in scripts/image_smoke.sh, which CI executes.
#
#   docker build -t ratelimitd .
#   docker run -p 50051:50051 -v ratelimitd-data:/data ratelimitd
FROM python:3.12-slim

RUN useradd --system --uid 10001 --home-dir /nonexistent --shell /usr/sbin/nologin ratelimitd \
    && mkdir /data && chown ratelimitd /data

WORKDIR /src
COPY pyproject.toml README.md ./
COPY ratelimitd ./ratelimitd
RUN pip install --no-cache-dir . && rm -rf /src

USER ratelimitd
WORKDIR /data
ENV RATELIMITD_LISTEN=0.0.0.0:50051 \
    RATELIMITD_METRICS_LISTEN=0.0.0.0:9464 \
    RATELIMITD_DATA_DIR=/data \
    PYTHONUNBUFFERED=1
VOLUME ["/data"]
EXPOSE 50051 9464
HEALTHCHECK --interval=10s --timeout=5s --start-period=20s --retries=3 \
    CMD ["ratelimitd", "health", "--address", "127.0.0.1:50051"]
ENTRYPOINT ["ratelimitd"]
CMD ["serve"]
