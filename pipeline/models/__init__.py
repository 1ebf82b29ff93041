"""Models: loading open_clip models by spec, prompt injection, and the tiny digits stand-in VLMs."""
