"""The runnable studies behind ``python -m matryoshka compare`` and ``... child-magnitude``."""
