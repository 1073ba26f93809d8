"""The bundled demo model: a tiny Jamba (HF checkpoint: config.json, model.safetensors, tokenizer.json,
generation_config.json) trained on the documentation topics of Python's ``pydoc_data``.
``jamba generate`` uses it when no ``--checkpoint`` is given; its recipe is ``benchmarks/train_demo.sh``
(see docs/training.md)."""

from pathlib import Path

DEMO_DIR = Path(__file__).parent

