"""The OpenAI-compatible server: api_server (app, routes, middleware), protocol (pydantic models), serving_*
(request handlers), metrics (Prometheus)."""
