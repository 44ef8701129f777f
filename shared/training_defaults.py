"""The product's local-training defaults as plain numbers (``shared.training.TrainConfig`` uses
them), importable without pydantic: command-line help reads them when it is built.

They are the setting the paired comparison measured (``docs/results.md``: 8 local steps of
batch 16 at lr 2e-3, a Fisher from 32 samples per device); devices, the cloud's rounds and both
simulate commands use this one set.
"""

STEPS = 8
BATCH_SIZE = 16
LR = 2e-3
FISHER_SAMPLES = 32
