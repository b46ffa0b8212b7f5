# normserve server image: CPU torch, non-root user, gRPC health check.
FROM python:3.11-slim

RUN useradd --create-home --uid 10001 normserve \
    && mkdir -p /var/lib/normserve && chown normserve /var/lib/normserve
WORKDIR /app

# torch first and pinned to the CPU build (the default wheel pulls CUDA libraries).
RUN pip install --no-cache-dir --index-url https://download.pytorch.org/whl/cpu torch==2.13.0

COPY pyproject.toml README.md ./
COPY proto ./proto
COPY src ./src
COPY server ./server
COPY client ./client
RUN pip install --no-cache-dir ".[server]"

USER normserve
ENV NORMSERVE_HOST=0.0.0.0 \
    NORMSERVE_PORT=50051 \
    NORMSERVE_METRICS_HOST=0.0.0.0 \
    NORMSERVE_METRICS_PORT=9464 \
    NORMSERVE_STATE_DIR=/var/lib/normserve
VOLUME /var/lib/normserve
EXPOSE 50051 9464

HEALTHCHECK --interval=10s --timeout=3s --start-period=20s --retries=3 \
    CMD ["normserve", "health", "--target", "127.0.0.1:50051"]

ENTRYPOINT ["normserve"]
CMD ["serve"]
