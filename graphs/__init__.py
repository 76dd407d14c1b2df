"""Ready-made pipelines; each module defines ``pipeline`` and ``make_pipeline(device=...)``."""
