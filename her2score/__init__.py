"""her2score: guideline HER2 IHC scoring of whole slides and fields of view.

    >>> from her2score import score_slide, check_eligibility
    >>> result = score_slide("slide.svs", guideline="breast-asco-cap-2023")
    >>> check_eligibility(result, "her2-low-breast").status
"""
__version__ = "0.1.0"

from .categories import CATEGORIES, Thresholds
from .eligibility import Decision, available_rules, check_eligibility, load_rule
from .guidelines import GUIDELINES, GuidelineCall, apply_guideline, h_score
from .pipeline import ScoringConfig, analyse_slide, score_slide
from .results import CnnReport, QCFinding, SlideResult
from .slide import ArraySlide, Slide, SlideError, open_slide

__all__ = [
    "__version__",
    "score_slide",
    "analyse_slide",
    "apply_guideline",
    "h_score",
    "check_eligibility",
    "load_rule",
    "available_rules",
    "open_slide",
    "Slide",
    "ArraySlide",
    "SlideError",
    "ScoringConfig",
    "Thresholds",
    "SlideResult",
    "QCFinding",
    "CnnReport",
    "GuidelineCall",
    "Decision",
    "CATEGORIES",
    "GUIDELINES",
]
