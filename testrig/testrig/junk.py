"""Malformed job-variable documents for fuzz tests: random JSON of every shape, in the fields
prefect-docker's template declares (the unit fuzz and the integration test share them)."""

from __future__ import annotations

import json
import random
import string
from typing import Any

FIELDS = ["image", "env", "labels", "command", "networks", "network_mode", "volumes",
          "mem_limit", "memswap_limit", "privileged", "auto_remove", "image_pull_policy",
          "stream_output", "container_create_kwargs", "pip_packages", "max_log_bytes",
          "stop_timeout", "registry_credentials", "name", "dockerfile_lines"]


def junk(rng: random.Random, depth: int = 0) -> Any:
    """A random JSON value: huge numbers and strings, NULs and surrogates, nested mixes."""
    kind = rng.randrange(7 if depth < 3 else 4)
    if kind == 0:
        return rng.randint(-(10**12), 10**12)
    if kind == 1:
        return "".join(rng.choices(string.printable, k=rng.choice([0, 5, 70_000])))
    if kind == 2:
        return rng.choice([True, None, 3.5, float("-0.0")])
    if kind == 3:
        return "\u0000\ud7ff☃" * rng.randint(1, 4)
    if kind == 4:
        return [junk(rng, depth + 1) for _ in range(rng.randint(0, 4))]
    return {rng.choice(["a", "", "env", "\u2603"]): junk(rng, depth + 1)
            for _ in range(rng.randint(0, 4))}


def junk_job_variables(rng: random.Random) -> dict[str, Any]:
    """One to four of FIELDS with junk values, as the server would store them (no NUL)."""
    document = {name: junk(rng) for name in rng.sample(FIELDS, rng.randint(1, 4))}
    return json.loads(json.dumps(document).replace("\\u0000", ""))
