"""her2score: guideline HER2 IHC scoring of whole slides and fields of view.

    >>> from her2score import score_slide, check_eligibility
    >>> result = score_slide("slide.svs", guideline="breast-asco-cap-2023")
    >>> check_eligibility(result, "her2-low-breast").status

The public names are imported on first use (PEP 562), so ``import her2score`` loads no numpy,
OpenCV, SciPy or torch.
"""
from __future__ import annotations

import importlib

__version__ = "0.5.5"

_SOURCES = {
    "score_slide": "pipeline",
    "analyse_slide": "pipeline",
    "ScoringConfig": "pipeline",
    "apply_guideline": "guidelines",
    "h_score": "guidelines",
    "GuidelineCall": "guidelines",
    "GUIDELINES": "guidelines",
    "check_eligibility": "eligibility",
    "load_rule": "eligibility",
    "available_rules": "eligibility",
    "Decision": "eligibility",
    "open_slide": "slide",
    "Slide": "slide",
    "ArraySlide": "slide",
    "SlideError": "slide",
    "NotHerIhcError": "slide",
    "WrongStainError": "pipeline",
    "NoTissueError": "pipeline",
    "NuclearStainError": "pipeline",
    "Thresholds": "categories",
    "CATEGORIES": "categories",
    "SlideResult": "results",
    "QCFinding": "results",
    "CnnReport": "results",
}
"""Public name -> the submodule that defines it."""

__all__ = ["__version__", *_SOURCES]


def __getattr__(name: str):
    if name not in _SOURCES:
        raise AttributeError(f"module 'her2score' has no attribute {name!r}")
    value = getattr(importlib.import_module(f".{_SOURCES[name]}", __name__), name)
    globals()[name] = value  # later look-ups skip this function
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *_SOURCES})
