"""pagellm: run and serve decoder-only LLMs within tight memory, fast."""
from pagellm.config import EngineConfig
from pagellm.engine.beam_search import BeamSearchOutput, BeamSearchParams
from pagellm.llm import LLM
from pagellm.outputs import CompletionOutput, Logprob, RequestOutput
from pagellm.sampling_params import SamplingParams, StructuredOutputsParams

__all__ = ["LLM", "SamplingParams", "StructuredOutputsParams", "RequestOutput", "CompletionOutput", "Logprob",
           "EngineConfig", "BeamSearchParams", "BeamSearchOutput"]
__version__ = "0.1.0"
