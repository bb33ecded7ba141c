"""Where a webhook may send: the egress guard of `libs.common.egress`, the one rule for every
outbound URL (checked when a webhook is written, and again before each delivery on the
addresses its host resolves to). The names below are kept for the webhook modules and tests."""

from __future__ import annotations

from libs.common.egress import EgressRefused as RefusedTarget
from libs.common.egress import check_resolved, check_url, refused_address

__all__ = ["RefusedTarget", "check_resolved", "check_url", "refused_address"]
