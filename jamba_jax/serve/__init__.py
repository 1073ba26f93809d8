"""Serving: a continuous-batching engine (``engine``) and an OpenAI-compatible HTTP server (``server``)."""

from .engine import Engine, Event, Params, QueueFull, Stream

__all__ = ["Engine", "Event", "Params", "QueueFull", "Stream"]
