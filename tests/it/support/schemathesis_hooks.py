"""Schemathesis hooks for tests/it/openapi.rs (loaded through SCHEMATHESIS_HOOKS).

`before_load_schema` works around Schemathesis's handling of tuples (see there);
`unauthenticated_is_refused` is the check of the run made without a token: every operation the
document marks as needing the bearer token must answer 401, whatever else the request holds.
"""

import schemathesis


def _loosen_tuples(node):
    """Rewrites each fixed-length tuple (`prefixItems` with `items: false`) as an array of exactly
    that many items, each of one of the tuple's types."""
    if isinstance(node, dict):
        prefix = node.get("prefixItems")
        if isinstance(prefix, list) and node.get("items") is False:
            del node["prefixItems"]
            node["items"] = {"anyOf": prefix}
            node["minItems"] = node["maxItems"] = len(prefix)
        for value in node.values():
            _loosen_tuples(value)
    elif isinstance(node, list):
        for value in node:
            _loosen_tuples(value)


@schemathesis.hook
def before_load_schema(context, raw_schema):
    """Schemathesis 4.32.5 turns a response schema's `prefixItems` (OpenAPI 3.1's tuples, which the
    document uses for pairs like a map's `[index, hash]`) into draft 4's `items: [...]` and then
    refuses that as no valid 3.1 schema ("Schema Error", the operation left untested). Its copy
    of the document gets the nearest form it reads, so those responses are still checked."""
    _loosen_tuples(raw_schema)


def _needs_token(case):
    operation = case.operation
    security = operation.definition.raw.get("security", operation.schema.raw_schema.get("security", []))
    # `[{}]` (or no requirement at all) marks a public operation.
    return bool(security) and {} not in security


@schemathesis.check
def unauthenticated_is_refused(ctx, response, case):
    """An operation that needs the bearer token answers 401 to a request without one."""
    if not _needs_token(case):
        return None
    if response.status_code != 401:
        raise AssertionError(
            f"{case.operation.label} without a token answered {response.status_code}, not 401"
        )
    return None
