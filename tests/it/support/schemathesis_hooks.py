"""Schemathesis hooks for tests/it/openapi.rs (loaded through SCHEMATHESIS_HOOKS).

`unauthenticated_is_refused` is the check of the run made without a token: every operation the
document marks as needing the bearer token must answer 401, whatever else the request holds.
"""

import schemathesis


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
