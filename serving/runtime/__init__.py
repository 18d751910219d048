"""onnxruntime sessions: one per graph, created with the server's settings, run off the event loop."""

from serving.runtime.context import RunContext
from serving.runtime.session import GraphSession, RuntimeOptions, SessionFactory

__all__ = ["GraphSession", "RunContext", "RuntimeOptions", "SessionFactory"]
