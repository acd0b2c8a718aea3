"""dockerworker: a Docker-native worker for self-hosted Prefect."""

__version__ = "0.1.0"
