"""Chat: templates, tool-call parsers."""
