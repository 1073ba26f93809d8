"""Bundled model configs (HF config.json format), addressable by name: ``JambaConfig.named("jamba-1.5-mini")``."""
