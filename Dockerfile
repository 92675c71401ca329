# The control plane image: one image for the control-plane worker, the provider worker and the
# one-shot topic creation (see docker-compose.yml). Runtime dependencies only, pinned in pyproject.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app

# Dependencies first, from pyproject.toml alone, so code changes do not reinstall them.
COPY pyproject.toml ./
RUN python -c "import tomllib; print('\n'.join(tomllib.load(open('pyproject.toml', 'rb'))['project']['dependencies']))" \
        > /tmp/requirements.txt \
    && pip install -r /tmp/requirements.txt \
    && rm /tmp/requirements.txt

# The project itself (no dev extras), plus the files its settings read relative to /app.
COPY README.md ./
COPY domain ./domain
COPY tables ./tables
COPY streams ./streams
COPY api ./api
COPY providers ./providers
RUN pip install --no-deps .
COPY topics.yaml ./topics.yaml
COPY config ./config

# Non-root; state dirs exist in the image so named volumes inherit their owner.
RUN useradd --create-home --uid 10001 --user-group app \
    && mkdir -p /var/lib/cp/worker /var/lib/cp/providers \
    && chown -R app:app /var/lib/cp
USER app

ENV CP_WEB_HOST=0.0.0.0 \
    CP_DATA_DIR=/var/lib/cp/worker \
    CP_PROVIDER_DATA_DIR=/var/lib/cp/providers

EXPOSE 6066 6067
CMD ["python", "-m", "faust", "-A", "streams.app", "worker", "-l", "info"]
