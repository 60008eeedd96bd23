"""Adapters that plug tierflow into training loops users already run.

    from tierflow.integrations.transformers import TieredTrainer      # transformers.Trainer
    from tierflow.integrations.transformers import TieredSFTTrainer   # TRL's SFTTrainer
    from tierflow.integrations.transformers import tiered             # tiered(AnyTrainerSubclass)
    from tierflow.integrations.peft import save_adapters              # PEFT adapters from the tiers

A layer above the API (docs/architecture.md): it uses the public API and below; nothing
below imports it. Each module imports its framework only when it is imported itself.
"""
