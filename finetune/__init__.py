"""Fine-tuning with refusal tokens: data (data.py), training (train.py), recipes, build and distill.

Needs the 'train' extra; torch, transformers and peft are imported inside functions only.
"""
