"""Fine-tuning with refusal tokens: data (data.py, pairs.py, rows.py), training (config.py,
encoding.py, model.py, trainer.py), recipes, build and distill.

Needs the 'train' extra; torch, transformers and peft are imported inside functions only.
"""
