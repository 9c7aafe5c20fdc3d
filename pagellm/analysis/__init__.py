"""Analyzer: memory calculator, fit advisor and per-layer roofline (``pagellm memory``, ``pagellm roofline``).

Independent of the engine: everything works from a ``ModelConfig`` and a
``Hardware`` description. Formulas live in the module docstrings of
``memory``, ``roofline`` and the neutral ``pagellm.sizing``; the plot is in ``plot`` (imported
on demand, it pulls in matplotlib).
"""
from pagellm.analysis.hardware import (HARDWARE_PRESETS, Hardware, custom_hardware, get_hardware,
                                       match_device_name)
from pagellm.analysis.memory import (Advice, FitReport, MemoryBreakdown, MemoryOptions, advise, fit, max_batch,
                                     max_context, memory_breakdown)
from pagellm.analysis.roofline import (EndToEnd, LayerRow, RooflineReport, StageReport, analyze, analyze_step,
                                       end_to_end, prediction_vs_measurement)

__all__ = [
    "HARDWARE_PRESETS", "Hardware", "custom_hardware", "get_hardware", "match_device_name",
    "Advice", "FitReport", "MemoryBreakdown", "MemoryOptions", "advise", "fit", "max_batch", "max_context",
    "memory_breakdown",
    "EndToEnd", "LayerRow", "RooflineReport", "StageReport", "analyze", "analyze_step", "end_to_end",
    "prediction_vs_measurement",
]
