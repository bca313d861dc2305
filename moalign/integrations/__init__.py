"""Bridges to other training frameworks.

* ``moalign.integrations.trl`` — ``MultiObjectiveGRPOTrainer`` (TRL's ``GRPOTrainer`` driven by a moalign weighting,
  for multi-GPU / multi-node runs through accelerate, DeepSpeed, FSDP and vLLM) and ``train_with_trl`` (the
  ``engine=trl`` path of ``moalign train``). See docs/scaling.md.

Submodules are imported on use: importing ``moalign`` never imports TRL.
"""
