"""One router per resource: search, items, and the service's own state."""
