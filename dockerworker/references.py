"""`{{ prefect.blocks.… }}` and `{{ prefect.variables.… }}` in a run's job configuration,
resolved from the server as Prefect's own workers do (prefect-docker included), so that
`env: {AWS_SECRET_ACCESS_KEY: "{{ prefect.blocks.secret.s3-secret }}"}` reaches the flow
container as the secret and not as the placeholder.

Forms, as in Prefect: `prefect.blocks.<type slug>.<document name>[.<path>]` (a block of one
`value`, like Secret, gives that value; a path walks its data, `key.list[0].key`) and
`prefect.variables.<name>`. A placeholder that is the whole string gives the value itself (a
dict, a number); inside other text it is replaced by its text. Block values that are secret
are collected for the masker.
"""

from __future__ import annotations

import json
import re
from typing import Any

from .api import NotFound, PrefectAPI
from .flowcode import block_secrets

_PLACEHOLDER = re.compile(r"\{\{\s*(prefect\.(?:blocks|variables)\.[^\s{}]+)\s*\}\}")
_INDEX = re.compile(r"^([^\[\]]+)((?:\[\d+\])*)$")


class UnresolvedReference(Exception):
    """A placeholder names a block, field or variable the server does not have."""


class References:
    """Resolves the placeholders of one run's job configuration; `secrets` holds what the
    blocks it read hold that must be masked."""

    def __init__(self, api: PrefectAPI) -> None:
        self.api = api
        self.secrets: set[str] = set()
        self._blocks: dict[tuple[str, str], dict[str, Any]] = {}

    def resolve(self, value: Any) -> Any:
        """`value` with every placeholder in it resolved."""
        if isinstance(value, dict):
            return {key: self.resolve(item) for key, item in value.items()}
        if isinstance(value, list):
            return [self.resolve(item) for item in value]
        if not isinstance(value, str) or "{{" not in value:
            return value
        whole = _PLACEHOLDER.fullmatch(value.strip())
        if whole:
            return self._lookup(whole.group(1))
        return _PLACEHOLDER.sub(lambda match: _text(self._lookup(match.group(1))), value)

    def _lookup(self, reference: str) -> Any:
        parts = reference.split(".")
        if parts[1] == "variables":
            return self._variable(reference, ".".join(parts[2:]))
        if len(parts) < 4:
            raise UnresolvedReference(f"{{{{ {reference} }}}} names no block document "
                                      "(prefect.blocks.<type>.<name>)")
        block_type, name, path = parts[2], parts[3], parts[4:]
        data = self._block(reference, block_type, name)
        if list(data) == ["value"] and path[:1] != ["value"]:
            path = ["value", *path]  # a block of one value (Secret, String…) gives that value
        return _walk(reference, data, path)

    def _block(self, reference: str, block_type: str, name: str) -> dict[str, Any]:
        if (block_type, name) not in self._blocks:
            try:
                data = self.api.read_block_data(block_type, name)
            except NotFound:
                raise UnresolvedReference(
                    f"{{{{ {reference} }}}}: there is no {block_type} block named {name!r}"
                ) from None
            self.secrets |= block_secrets(block_type, data)
            self._blocks[(block_type, name)] = data
        return self._blocks[(block_type, name)]

    def _variable(self, reference: str, name: str) -> Any:
        try:
            return self.api.read_variable(name)
        except NotFound:
            raise UnresolvedReference(
                f"{{{{ {reference} }}}}: there is no variable named {name!r}") from None


def _walk(reference: str, data: Any, path: list[str]) -> Any:
    value = data
    for part in path:
        match = _INDEX.match(part)
        keys: list[str | int] = [match.group(1)] if match else [part]
        if match and match.group(2):
            keys += [int(i) for i in re.findall(r"\d+", match.group(2))]
        for key in keys:
            try:
                value = value[key]
            except (KeyError, IndexError, TypeError):
                raise UnresolvedReference(f"{{{{ {reference} }}}}: the block has no {part!r}"
                                          ) from None
    return value


def _text(value: Any) -> str:
    return value if isinstance(value, str) else json.dumps(value)
