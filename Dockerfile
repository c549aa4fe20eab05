# One image for both programs: `python -m worker run` (default) and `python -m governor run`.
# Base images are build arguments, so the image builds where no registry is reachable (CI builds
# local stand-ins with .ci/docker.sh):  docker build --build-arg PYTHON_IMAGE=my/python:3.11 .
ARG PYTHON_IMAGE=python:3.11-slim

# --- dependencies: their own layer, rebuilt only when pyproject.toml changes ----------------------
FROM ${PYTHON_IMAGE} AS deps
ENV PIP_NO_CACHE_DIR=1 PIP_DISABLE_PIP_VERSION_CHECK=1 PYTHONDONTWRITEBYTECODE=1
RUN python3 -m venv /opt/venv
WORKDIR /src
COPY pyproject.toml ./
RUN /opt/venv/bin/python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" > requirements.txt \
    && /opt/venv/bin/pip install -r requirements.txt

# --- the code: a change here reuses the dependency layer above -------------------------------------
FROM deps AS app
COPY README.md ./
COPY fleet ./fleet
COPY worker ./worker
COPY governor ./governor
RUN /opt/venv/bin/pip install --no-deps . && /opt/venv/bin/python -m compileall -q /opt/venv

# --- runtime: no build tools, non-root ---------------------------------------------------------
FROM ${PYTHON_IMAGE}
ENV PYTHONDONTWRITEBYTECODE=1 PYTHONUNBUFFERED=1 PATH=/opt/venv/bin:$PATH \
    DATA_DIR=/app/data SESSIONS_DIR=/app/sessions
COPY --from=app /opt/venv /opt/venv
COPY deploy/container-run.sh /usr/local/bin/container-run
# data/ and sessions/ belong to the container user: named volumes mounted there start with this
# ownership, so the workers can write files and read session files.
RUN useradd --create-home --uid 10001 fetcher \
    && mkdir -p /app/data /app/sessions \
    && chown fetcher:fetcher /app/data /app/sessions && chmod 0700 /app/sessions
WORKDIR /app
USER 10001:10001
STOPSIGNAL SIGTERM
HEALTHCHECK --interval=30s --timeout=5s --start-period=30s --retries=3 \
    CMD ["python", "-m", "worker", "check"]
ENTRYPOINT ["/usr/local/bin/container-run"]
CMD ["python", "-m", "worker", "run"]
