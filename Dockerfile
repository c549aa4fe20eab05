# One image for both programs: `python -m worker` (default) and `python -m governor run`.
FROM python:3.11-slim
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PIP_NO_CACHE_DIR=1
WORKDIR /app
COPY pyproject.toml README.md ./
COPY worker ./worker
COPY governor ./governor
RUN pip install . && useradd --create-home --uid 10001 fetcher \
    && mkdir -p /app/data /app/sessions && chown -R fetcher /app/data /app/sessions \
    && chmod 0700 /app/sessions
USER fetcher
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "worker", "check"]
CMD ["python", "-m", "worker", "run"]
