# amqproxy-mp container image: the master runs as PID 1 in the foreground and forks its workers.
#   docker build -t amqproxy-mp .
#   docker run --rm -p 5673:5673 -p 15673:15673 amqproxy-mp amqp://rabbitmq.example.com
#   docker run ... -v ./amqproxy.yaml:/etc/amqproxy/amqproxy.yaml:ro amqproxy-mp -c /etc/amqproxy/amqproxy.yaml

FROM python:3.11-slim AS build
WORKDIR /src
COPY pyproject.toml README.md ./
COPY amqproxy_mp ./amqproxy_mp
# wheels of the project and its runtime dependencies only (all have binary wheels: no compiler)
RUN pip wheel --no-cache-dir --wheel-dir /wheels .

FROM python:3.11-slim
RUN useradd --system --uid 10001 --user-group --no-create-home --shell /usr/sbin/nologin amqproxy
COPY --from=build /wheels /wheels
RUN pip install --no-cache-dir --no-index --find-links /wheels amqproxy-mp \
    && rm -rf /wheels
USER amqproxy:amqproxy
# Listen on all interfaces of the container (the default, localhost, is unreachable from
# other containers); a config file or -l overrides it. HTTP (/healthz, /metrics, /pools, which
# names users and vhosts) stays on the container's loopback, where the HEALTHCHECK below
# reaches it; set HTTP_ADDRESS=0.0.0.0 to publish it (see docs/security.md).
# PYTHONMALLOC=malloc: memory a storm of connections took is given back (docs/operations.md).
ENV LISTEN_ADDRESS=0.0.0.0 \
    PROMETHEUS_MULTIPROC_DIR=/tmp/amqproxy-metrics \
    PYTHONMALLOC=malloc \
    PYTHONDONTWRITEBYTECODE=1 \
    PYTHONUNBUFFERED=1
EXPOSE 5673 15673
# TERM is the graceful stop (workers drain; see term_client_close_timeout and term_timeout):
# give `docker stop -t` / stop_grace_period more than their sum.
STOPSIGNAL SIGTERM
# 200 while every worker is up and beating; HTTP_PORT if the port was moved by environment.
HEALTHCHECK --interval=10s --timeout=3s --start-period=10s --retries=3 \
    CMD ["python", "-c", "import os, sys, urllib.request; sys.exit(0 if urllib.request.urlopen('http://127.0.0.1:' + os.environ.get('HTTP_PORT', '15673') + '/healthz', timeout=2).status == 200 else 1)"]
ENTRYPOINT ["amqproxy"]
