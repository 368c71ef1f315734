"""Scoring predictions: the metric registry and the resources it needs, paired bootstrap CIs, position segments,
the LLM judge, and the report files. The `evaluate` verb is `flythinker.cli.evaluate`."""
