"""A handler module whose own import fails (a missing dependency)."""

import asya_missing_dependency_xyz  # noqa: F401


def process(payload):
    return payload
