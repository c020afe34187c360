"""Training: the one `Trainer` (trainer.py) behind `engram train` (loop.py), `engram retrofit` and
`engram memory write`; optimizers, metrics, and how a run computes (engine.py)."""
