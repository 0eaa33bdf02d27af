"""The checks a call passes in order before it may go to InvoisX: target, caller, client,
policy, limits, rate limit, idempotency."""
