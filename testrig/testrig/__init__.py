"""dockerworker's test rig: a real Prefect server on loopback, a small REST client over it,
Docker helpers (`prefect_rig`), `dockerworker start` as a subprocess (`workers`), a
fault-injecting proxy between a worker and the server (`faultproxy`) and a second Docker
engine of the test's own that can be restarted (`engine`), both for issue 14's tests, and the
remote code sources of issue 16's pull steps: git over smart HTTP(S) and SSH (`gitserve`) and an
S3-compatible server with authentication enforced (`s3serve`).

Used by tests/, bench/ and examples/. It is a distribution of its own (testrig/pyproject.toml),
installed editable into the dev venv by `make setup`, so that the runtime wheel holds only
`dockerworker`. It works from the repository it lives in (it builds the test images from
tests/ and the worker image from the top-level Dockerfile).
"""
