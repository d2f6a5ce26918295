"""Engines behind one interface, chosen through the backend registry (`engines.registry`): the
torch-native engine (DDP, FSDP2, tensor parallel) and DeepSpeed ZeRO. Backends are imported only
when chosen, so a DDP run never imports deepspeed."""

from __future__ import annotations

from scaletrain.engines.base import Engine, EngineSpec, StepStats
from scaletrain.engines.registry import build_engine

__all__ = ["Engine", "EngineSpec", "StepStats", "build_engine"]
