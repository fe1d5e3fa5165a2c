# The service's image: the web app (gunicorn) by default; the worker and the migrations are
# the same image with another command (docs/deploy.md):
#   docker run --env-file prod.env -p 8000:8000 IMAGE              # web, on $PORT (8000)
#   docker run --env-file prod.env IMAGE flask --app service worker
#   docker run --env-file prod.env IMAGE flask --app service migrate
# It listens on every interface (HOST=0.0.0.0): give it API_KEYS on any reachable host.
FROM python:3.11-slim

ENV PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1 \
    PIP_NO_CACHE_DIR=1 \
    PIP_DISABLE_PIP_VERSION_CHECK=1

WORKDIR /app
# Runtime dependencies only (requirements.txt, pinned): none of the test tools.
COPY requirements.txt ./
RUN pip install --no-cache-dir -r requirements.txt \
    && groupadd --gid 10001 app \
    && useradd --create-home --uid 10001 --gid app --shell /usr/sbin/nologin app \
    && mkdir /app/.data \
    && chown app:app /app/.data

COPY service/ service/
COPY sql/ sql/
COPY wsgi.py gunicorn.conf.py ./

# The user app, by number (a platform may refuse to run a name it cannot resolve as non-root).
USER 10001:10001
# A container's loopback is its own: listen on every interface, on $PORT.
ENV HOST=0.0.0.0 \
    PORT=8000
EXPOSE 8000
CMD ["gunicorn", "-c", "gunicorn.conf.py", "wsgi:app"]
