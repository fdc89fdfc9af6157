"""Gradient-spike telemetry: the paper's Gradient Spike Score, per-layer statistics, logs and reports."""

from .layers import LAYER_TYPES, depth, layer_type
from .monitor import SpikeMonitor

__all__ = ["SpikeMonitor", "LAYER_TYPES", "layer_type", "depth"]
