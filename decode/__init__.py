"""Decoding, as named parts that ``Engine`` orchestrates (``s1fast.decode.engine``):

- ``SamplingParams`` / ``Request`` (``params``): one request's settings, frozen and checked when built;
- ``Scheduler`` (``scheduler``): the waiting queue, the cache rows and positions, admission over the ``KVCache``'s
  pages (``kv_cache``), preemption of the newest, leaving; it says what to run and takes back what was decided;
- the runner, ``Decoder`` (``decoder``): the model's forward over the paged cache, CUDA graphs, sampling on the
  device (``sampling``); its public runner methods (``start``, ``prefill``, ``step``, ``feed``, ``load``,
  ``move_row``) are what the engine calls, and ``generate`` / ``stream`` are clients of the engine;
- budget forcing (``budget``): ``BudgetForcing`` settings and the per-request ``RowState``;
- results (``results``): ``RowResult`` per request (what was injected, where the answer starts),
  ``GenerationResult``;
- the commands ``s1fast generate`` (``generate``) and ``s1fast serve`` (``serve``: FastAPI routes over the OpenAI
  request/response models of ``protocol`` (pydantic; bounds, refused fields, our budget-forcing extensions), with
  stop strings and incremental text from ``detokenize``).
"""

from s1fast.decode.budget import BudgetForcing
from s1fast.decode.decoder import Decoder, GenerationResult
from s1fast.decode.engine import Engine
from s1fast.decode.params import SamplingParams
from s1fast.decode.scheduler import Scheduler

__all__ = ["BudgetForcing", "Decoder", "Engine", "GenerationResult", "SamplingParams", "Scheduler"]
