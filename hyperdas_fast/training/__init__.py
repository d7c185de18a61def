"""Training: ``Trainer`` / ``TrainConfig`` (trainer.py), checkpoints (checkpoint.py),
data-parallel helpers (distributed.py), loss and schedules (losses.py)."""


def __getattr__(name):
    if name in ("Trainer", "TrainConfig"):
        from . import trainer

        return getattr(trainer, name)
    raise AttributeError(f"module 'hyperdas_fast.training' has no attribute {name!r}")


__all__ = ["Trainer", "TrainConfig"]
