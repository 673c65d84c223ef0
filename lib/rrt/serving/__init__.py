"""Serving Recursive Transformers: the continuous depth-wise batching engine and its reference."""
from rrt.serving.engine import Engine, Request
from rrt.serving.reference import reference_generate

__all__ = ["Engine", "Request", "reference_generate"]
