# Test flows image: the Prefect runtime image plus tests/flows/ at /opt/flows.
# Built by the `flow_image` fixture with the tests directory as context:
#   docker build -f tests/images/flows.Dockerfile -t dockerworker-test/flows:dev tests
ARG PREFECT_IMAGE=dockerworker/prefect:3.9.1-local
FROM ${PREFECT_IMAGE}
ENV DO_NOT_TRACK=1
COPY flows/ /opt/flows/
