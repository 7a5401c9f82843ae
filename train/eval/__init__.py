"""Evaluation of a trained captioner (the training loop's validation loss is train/trainer.py's).

`scorer.py` `mm eval` (caption scores per task, under image changes too), `caption_metrics.py`
BLEU/ROUGE-L/CIDEr, exact match and scene attribute accuracy, `calibrate.py` `mm calibrate`.
"""
