"""Evaluation of a trained captioner: `mm eval` (scorer), caption metrics, `mm calibrate`."""
