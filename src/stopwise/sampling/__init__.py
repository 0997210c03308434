"""Calibrated early stopping of LLM test-time compute: self-consistency sampling and reasoning.

Pieces (torch is imported only by :mod:`stopwise.sampling.local` and the server's model):

- backends: :class:`~stopwise.sampling.local.LocalBackend` (Hugging Face, seeded),
  :class:`HTTPBackend` (OpenAI-compatible endpoints), :class:`CallableBackend`, and
  :class:`ReplayBackend` (recorded completions in recorded order, for offline evaluation);
- answer extraction (:mod:`stopwise.sampling.extract`), votes (:mod:`stopwise.sampling.vote`);
- stopping rules for samples (:mod:`stopwise.sampling.rules`), the :class:`AdaptiveSampler`;
- DSC's allocation of a total sample budget across questions by difficulty
  (:class:`DifficultyAllocator`, :mod:`stopwise.sampling.allocate`);
- recording N samples per question into a resumable checkpoint and a Trace
  (:mod:`stopwise.sampling.record`), and :func:`certify` for a calibrated stop;
- DEER reasoning early exit (:mod:`stopwise.sampling.deer`); ``stopwise serve``.
"""

from __future__ import annotations

from stopwise.sampling.allocate import Allocation, DifficultyAllocator
from stopwise.sampling.backends import CallableBackend, EndpointError, HTTPBackend, ReplayBackend
from stopwise.sampling.certify import certify, split_certify
from stopwise.sampling.data import Question, load_questions, math_questions
from stopwise.sampling.extract import (
    ChoiceExtractor,
    MarkerExtractor,
    NumberExtractor,
    StringExtractor,
    make_extractor,
)
from stopwise.sampling.record import convert, read_checkpoint, record, trace_from_records
from stopwise.sampling.rules import (
    ConfidenceStop,
    DifficultyAdaptive,
    DirichletPosterior,
    FirstFinish,
    OnSamples,
    VoteSettled,
    sampling_rule,
)
from stopwise.sampling.sampler import AdaptiveSampler, QuestionResult, summarise
from stopwise.sampling.types import Completion, GenerationCancelled, token_score

__all__ = [
    "AdaptiveSampler", "Allocation", "CallableBackend", "ChoiceExtractor", "Completion", "ConfidenceStop",
    "DifficultyAdaptive", "DifficultyAllocator", "DirichletPosterior", "EndpointError", "FirstFinish",
    "GenerationCancelled", "HTTPBackend", "MarkerExtractor", "NumberExtractor", "OnSamples", "Question",
    "QuestionResult", "ReplayBackend", "StringExtractor", "VoteSettled", "certify", "convert",
    "load_questions", "make_extractor", "math_questions", "read_checkpoint", "record", "sampling_rule",
    "split_certify", "summarise", "token_score", "trace_from_records",
]
