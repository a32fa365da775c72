"""Entry points: the `pagedllm` command (cli.py) and the OpenAI-compatible server (openai/)."""
