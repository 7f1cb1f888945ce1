"""Training machinery, one concern per module: ``optim`` (parameter groups, AdamW, LR schedule),
``mixup`` (mixup/cutmix and soft-target losses), ``ema``, ``checkpoint`` (atomic save, resume),
``distributed`` (process group, sharding helpers, failing fast), ``logs`` (JSON lines, plot)."""
