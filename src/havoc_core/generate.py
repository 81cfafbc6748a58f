"""The generation API in one import, as documented since 0.1 (``from havoc_core.generate import
Engine, SamplingParams, load_for_inference``). Each name is defined in its own module."""

from havoc_core.engine import Completion, Engine, Event
from havoc_core.inference import load_for_inference, prepare_model
from havoc_core.sampling import SamplingParams

__all__ = ["Completion", "Engine", "Event", "SamplingParams", "load_for_inference", "prepare_model"]
