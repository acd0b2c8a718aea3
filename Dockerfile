# dockerworker's own image: small (no compilers, no Prefect), non-root, health-checked.
#
#   docker build -t dockerworker .                                  # from python:3.12-slim
#   docker build --build-arg BASE_IMAGE=dockerworker/local-python:bookworm -t dockerworker .
#
# Run it with the Docker socket and the socket's group (see docs/security.md):
#   docker run -v /var/run/docker.sock:/var/run/docker.sock \
#     --group-add "$(stat -c %g /var/run/docker.sock)" \
#     -e PREFECT_API_URL=http://prefect:4200/api dockerworker start --pool my-pool
#
# Behind a TLS-inspecting proxy, put its CA bundle next to this file as build-ca.crt: pip
# trusts it during the build only (it is not copied into the final image).
ARG BASE_IMAGE=python:3.12-slim

FROM ${BASE_IMAGE} AS build
COPY pyproject.toml README.md build-ca.cr[t] /src/
COPY dockerworker /src/dockerworker
RUN if [ -s /src/build-ca.crt ]; then export PIP_CERT=/src/build-ca.crt; fi \
 && python3 -m venv /opt/dockerworker \
 && /opt/dockerworker/bin/pip install --no-cache-dir --disable-pip-version-check /src \
 && /opt/dockerworker/bin/pip uninstall -y --disable-pip-version-check pip setuptools \
 && find /opt/dockerworker -name '__pycache__' -prune -exec rm -rf {} +

FROM ${BASE_IMAGE}
COPY --from=build /opt/dockerworker /opt/dockerworker
ENV PATH=/opt/dockerworker/bin:/usr/local/sbin:/usr/local/bin:/usr/sbin:/usr/bin:/sbin:/bin \
    PYTHONUNBUFFERED=1 \
    DOCKERWORKER_HEALTH_PORT=8080
# Not root: give the container the Docker socket's group at run time (--group-add).
USER 10001:10001
EXPOSE 8080
HEALTHCHECK --interval=15s --timeout=5s --start-period=30s --retries=3 \
  CMD ["python3", "-c", "import os, urllib.request; urllib.request.urlopen('http://127.0.0.1:%s/health' % os.environ['DOCKERWORKER_HEALTH_PORT'], timeout=4)"]
ENTRYPOINT ["dockerworker"]
CMD ["--help"]
