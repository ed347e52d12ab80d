"""Evaluation of posterior samplers: calibration metrics over an observation set
(:mod:`.calibration`, inputs read by :mod:`.records`) and the report built from their summaries
(:mod:`.report`, :mod:`.results_page`, rendered through :mod:`.doc`)."""
