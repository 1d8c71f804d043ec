"""Evaluation and calibration: labelled prompts in, refusal rates, curves, reports and calibrated thresholds out."""
