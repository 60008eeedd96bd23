"""Hugging Face `transformers.Trainer` (and TRL's trainers) training through a tierflow engine.

    from tierflow.integrations.transformers import TieredTrainer
    trainer = TieredTrainer(model=model, args=TrainingArguments(...), train_dataset=ds,
                            tierflow_options=dict(device_memory="8GiB", host_memory="32GiB",
                                                  nvme="/mnt/nvme/tierflow"))
    trainer.train()                                  # or trainer.train(resume_from_checkpoint=True)

`TieredTrainer` is `transformers.Trainer` with the few hooks below overridden;
`TieredSFTTrainer` is TRL's `SFTTrainer` with the same hooks, and `tiered(cls)` makes the
tiered version of any other Trainer subclass. Everything else (data loading, gradient
accumulation, loss scaling, logging, callbacks, evaluation, checkpoint rotation) is the
Trainer's own. What is overridden, and why:

- `create_optimizer`: the engine is built here, over `self.model` as the Trainer (and TRL,
  PEFT) left it, just before accelerate prepares model and optimizer. The optimizer is a
  `tierflow.AdamW` with the Trainer's lr, betas, eps and its two weight-decay groups
  (`get_decay_parameter_names`, exactly as `Trainer.create_optimizer` forms them);
  `optim="adamw_torch_fused"` (the default with torch >= 2.8) gives `fused=True`,
  `"adamw_torch"` `fused=False`: each equals the torch optimizer bit for bit. Other `optim`s
  are refused. When resuming, the engine and optimizer come from the tierflow checkpoint.
  The Trainer's own `create_scheduler` then schedules `param_groups` as usual.
- `_clip_grad_norm` / `_get_grad_norm`: the engine moves each gradient out of the device as
  autograd produces it (`param.grad` is a view of the tiered gradient that only torch's own
  `clip_grad_norm_` may use), so both go straight through `tierflow.AdamW.clip_grad_norm_`:
  the exact global norm over every tier, as torch computes it, without accelerate's wrapping.
- `_save_optimizer_and_scheduler`: after the Trainer's files (optimizer.pt, which holds
  hyper-parameters only, and scheduler.pt), writes the engine's crash-safe checkpoint (fp32
  master weights, Adam moments and steps from every tier) to `checkpoint-N/tierflow/`.
- `_load_from_checkpoint`: a checkpoint with `tierflow/` is resumed from it (in
  `create_optimizer`) instead of loading its exported weights into the model; the
  Trainer then loads optimizer hyper-parameters, scheduler, RNG and step as usual.
- `_save`: the model's parameters are placeholders once the engine holds the state, so
  `save_model` exports the engine's weights (`engine.save_pretrained`, streamed shard by
  shard; PEFT models through their own `save_pretrained` with the engine's state dict).
- `_move_model_to_device`: the Trainer would move the whole model to the GPU first; the
  engine places the state within its budgets instead, so the model need not fit there.

Settings that would bypass the engine are refused when the trainer is made (fp16's
GradScaler, DeepSpeed, FSDP, several processes or GPUs, other optimizers,
`load_best_model_at_end`), so nothing is silently skipped. The Trainer's activation
(gradient) checkpointing, on by default in TRL's SFTConfig, becomes the engine's own:
`activations="recompute"` unless `tierflow_options` chooses another `activations`.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch
import transformers

from tierflow.api import offload, resume
from tierflow.errors import ConfigError
from tierflow.runtime.optimizer import AdamW

TIERFLOW_DIR = "tierflow"  # the engine's checkpoint inside the Trainer's checkpoint-N folder
FUSED = {"adamw_torch_fused": True, "adamw_torch": False}


def unsupported_settings(args) -> list[str]:
    """What in `args` would bypass the engine (empty: nothing)."""
    problems = []
    optim = str(getattr(args.optim, "value", args.optim))
    if optim not in FUSED:
        problems.append(f"optim={optim!r} (tierflow trains with AdamW: use 'adamw_torch_fused' or 'adamw_torch')")
    if args.optim_args:
        problems.append(f"optim_args={args.optim_args!r} (set lr, betas, eps and weight_decay in the arguments)")
    if args.fp16:
        problems.append("fp16=True (the GradScaler cannot see the engine's gradients: use bf16=True or "
                        "tierflow_options=dict(dtype=torch.bfloat16))")
    if args.deepspeed or args.fsdp:
        problems.append("DeepSpeed / FSDP (the engine shards and offloads the state itself)")
    if args.world_size > 1 or args.n_gpu > 1:
        problems.append(f"{max(args.world_size, args.n_gpu)} processes or GPUs (run one process on one device, "
                        f"e.g. CUDA_VISIBLE_DEVICES=0)")
    if args.load_best_model_at_end:
        problems.append("load_best_model_at_end=True (not supported yet: resume the best checkpoint instead)")
    return problems


def checkpointing_requested(args) -> bool:
    return bool(getattr(args, "activation_checkpointing", False) or getattr(args, "gradient_checkpointing", False))


class TieredTrainerMixin:
    """The overrides that make a `transformers.Trainer` (or subclass) train through tierflow.

    Put it first among the bases: `class MyTrainer(TieredTrainerMixin, SomeTrainer)`, or use
    `tiered(SomeTrainer)`. `tierflow_options` are the keyword arguments of `tierflow.offload`
    (device, device_memory, host_memory, nvme, dtype, plan, activations, unit_bytes, ...);
    `device` defaults to the Trainer's device. `trainer.engine` is the engine once training
    has begun (None before); close it (`trainer.engine.close()`) when done.
    """

    engine = None

    def __init__(self, *args, tierflow_options: dict | None = None, **kwargs):
        self.tierflow_options = dict(tierflow_options or {})
        self.engine = None
        self._resume_from = None  # a checkpoint-N folder with a tierflow/ checkpoint
        super().__init__(*args, **kwargs)
        if checkpointing_requested(self.args):
            # The Trainer's torch.utils.checkpoint wrappers would sit between the engine's hooks and
            # autograd; the engine recomputes each layer itself (same arithmetic, the RNG replayed).
            self.tierflow_options.setdefault("activations", "recompute")
            self.args.activation_checkpointing = False
            if hasattr(self.args, "gradient_checkpointing"):
                self.args.gradient_checkpointing = False
        missing = [name for name in ("_clip_grad_norm", "_get_grad_norm", "_save_optimizer_and_scheduler",
                                     "_load_from_checkpoint", "_save", "_move_model_to_device")
                   if not hasattr(transformers.Trainer, name)]
        if missing:
            raise ConfigError(f"this transformers {transformers.__version__} Trainer has no {missing}: "
                              f"tierflow's Trainer integration needs transformers >= 5.0")
        problems = unsupported_settings(self.args)
        if self.optimizer is not None or self.lr_scheduler is not None:
            problems.append("optimizers=(...) (the trainer makes a tierflow.AdamW and the Trainer's scheduler)")
        if getattr(self, "optimizer_cls_and_kwargs", None) is not None:
            problems.append("optimizer_cls_and_kwargs (the trainer makes a tierflow.AdamW)")
        if problems:
            raise ConfigError(f"{type(self).__name__} cannot train through tierflow with: " + "; ".join(problems))

    # ---- the engine and its optimizer ----------------------------------------------------
    def engine_options(self) -> dict:
        """Keyword arguments for tierflow.offload / tierflow.resume."""
        options = dict(self.tierflow_options)
        options.setdefault("device", self.args.device.type)
        if "plan" in options:  # resume knows it as placement
            options["placement"] = options.pop("plan")
        return options

    def create_optimizer(self, model=None):
        """Build the engine over `self.model` and its tierflow.AdamW (once per trainer)."""
        if self.engine is not None:
            return self.optimizer
        args = self.args
        if self._resume_from is not None:
            self.engine, optimizer = resume(Path(self._resume_from) / TIERFLOW_DIR, model=self.model,
                                            restore_rng=False, **self.engine_options())
            if optimizer is None:
                raise ConfigError(f"{self._resume_from}/{TIERFLOW_DIR} holds no optimizer state")
        else:
            self.engine = offload(self.model, **self.engine_options())
            decay = set(self.get_decay_parameter_names(self.model))
            named = [(n, p) for n, p in self.model.named_parameters() if p.requires_grad]
            groups = [{"params": [p for n, p in named if n in decay], "weight_decay": args.weight_decay},
                      {"params": [p for n, p in named if n not in decay], "weight_decay": 0.0}]
            optimizer = AdamW(self.engine, params=groups, lr=args.learning_rate,
                              betas=(args.adam_beta1, args.adam_beta2), eps=args.adam_epsilon,
                              weight_decay=args.weight_decay,
                              fused=FUSED[str(getattr(args.optim, "value", args.optim))])
        self.optimizer = optimizer
        return optimizer

    # ---- gradients: the engine holds them, not param.grad ---------------------------------
    def _clip_grad_norm(self, model):
        """Clip to max_grad_norm over every tier; returns the norm before clipping."""
        return self.engine.optimizer.clip_grad_norm_(self.args.max_grad_norm)

    def _get_grad_norm(self, model, grad_norm=None):
        """The gradient norm to log; without clipping, measured as torch's clip with inf does."""
        if grad_norm is None:
            grad_norm = self.engine.optimizer.clip_grad_norm_(float("inf"))
        return grad_norm

    # ---- checkpoints ---------------------------------------------------------------------
    def _save_optimizer_and_scheduler(self, output_dir: str) -> None:
        """The Trainer's optimizer.pt (hyper-parameters) and scheduler.pt, then the engine's state."""
        super()._save_optimizer_and_scheduler(output_dir)
        if self.args.should_save:
            self.engine.save(Path(output_dir) / TIERFLOW_DIR, extra={"global_step": self.state.global_step})

    def _load_from_checkpoint(self, resume_from_checkpoint: str, model=None) -> None:
        """Remember a tierflow checkpoint for create_optimizer; otherwise load weights as usual."""
        tiered = (Path(resume_from_checkpoint) / TIERFLOW_DIR).is_dir()
        if self.engine is not None:
            raise ConfigError("resume_from_checkpoint with a trainer whose engine already trained: make a "
                              "new trainer (and model) to resume")
        if not tiered:  # a plain Trainer checkpoint: its weights go into the model, the engine starts there
            return super()._load_from_checkpoint(resume_from_checkpoint, model)
        self._resume_from = resume_from_checkpoint

    def _save(self, output_dir: str | None = None, state_dict=None) -> None:
        """Export the engine's weights (the model's own parameters are placeholders)."""
        if self.engine is None or state_dict is not None:
            return super()._save(output_dir, state_dict)
        output_dir = output_dir if output_dir is not None else self.args.output_dir
        if not isinstance(self.model, transformers.PreTrainedModel):  # e.g. PEFT: adapters from the state dict
            return super()._save(output_dir, self.engine.state_dict())
        if not self.args.should_save:
            return None
        self.engine.save_pretrained(output_dir)
        if self.processing_class is not None:
            self.processing_class.save_pretrained(output_dir)
        torch.save(self.args, os.path.join(output_dir, transformers.trainer.TRAINING_ARGS_NAME))
        return None

    def _move_model_to_device(self, model, device) -> None:
        """Left where it is: the engine places the state within its budgets."""
        return None


def tiered(trainer_cls: type) -> type:
    """The tiered version of a `transformers.Trainer` subclass (TRL's trainers, your own)."""
    if not (isinstance(trainer_cls, type) and issubclass(trainer_cls, transformers.Trainer)):
        raise ConfigError(f"tiered() takes a transformers.Trainer subclass, got {trainer_cls!r}")
    return type(f"Tiered{trainer_cls.__name__}", (TieredTrainerMixin, trainer_cls),
                {"__doc__": f"{trainer_cls.__name__} training through a tierflow engine (see TieredTrainerMixin).",
                 "__module__": __name__})


class TieredTrainer(TieredTrainerMixin, transformers.Trainer):
    """`transformers.Trainer` training through a tierflow engine: same arguments, plus
    `tierflow_options` (the keyword arguments of `tierflow.offload`)."""


def __getattr__(name: str):
    if name == "TieredSFTTrainer":  # TRL is optional: imported only when asked for
        from trl import SFTTrainer

        cls = tiered(SFTTrainer)
        globals()[name] = cls
        return cls
    raise AttributeError(name)
