"""The OpenAI-compatible server: api_server (app + routes), protocol (pydantic models), serving_* (handlers), metrics."""
