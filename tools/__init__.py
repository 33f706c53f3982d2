"""Command-line tools: the ``jt808`` entry point, decoding, simulation and replay."""
