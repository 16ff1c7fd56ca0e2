"""her2score: guideline HER2 IHC scoring of whole slides and fields of view."""
__version__ = "0.1.0"
