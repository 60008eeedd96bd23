"""tierflow inside Hugging Face's Trainer and TRL's SFTTrainer (tierflow.integrations.transformers).

Every comparison runs the plain Trainer with torch's AdamW (optim="adamw_torch_fused", the
same kernel as tierflow.AdamW(fused=True); "adamw_torch" against fused=False) and the
tiered trainer on the same data, seed and tiny model (fp32, CPU), with small units and
budgets that put the state on device, host and NVMe. Losses, the logged grad_norm, the
final weights and the Adam moments must be bitwise equal: the arithmetic is the same.
"""
from __future__ import annotations

import warnings

import pytest
import torch

import tierflow

from conftest import MIX_BUDGETS, SMALL_UNITS, VOCAB, assert_bitwise, assert_state_bitwise, make_batches, make_tiny

transformers = pytest.importorskip("transformers")
pytest.importorskip("accelerate")
from tierflow.integrations.transformers import TieredTrainer, tiered  # noqa: E402

STEPS, BATCH = 4, 2


def dataset(n_sequences: int):
    return [{"input_ids": ids[0], "labels": ids[0]} for ids in make_batches(n_sequences, batch=1)]


def training_args(out, **overrides):
    kwargs = dict(output_dir=str(out), max_steps=STEPS, per_device_train_batch_size=BATCH, learning_rate=1e-2,
                  weight_decay=0.01, warmup_steps=1, logging_steps=1, save_strategy="no", report_to=[],
                  seed=42, use_cpu=True, disable_tqdm=True, dataloader_num_workers=0)
    kwargs.update(overrides)
    return transformers.TrainingArguments(**kwargs)


class Recording:
    """Records every micro-batch loss and every step's grad_norm as the Trainer sees them."""

    def training_step(self, *args, **kwargs):
        loss = super().training_step(*args, **kwargs)
        self.losses.append(loss.detach().clone())
        return loss

    def _get_grad_norm(self, model, grad_norm=None):
        norm = super()._get_grad_norm(model, grad_norm)
        self.norms.append(torch.as_tensor(norm).detach().clone())
        return norm


class PlainTrainer(Recording, transformers.Trainer):
    pass


class TieredRecording(Recording, TieredTrainer):
    pass


def options(tmp_path, name):
    return dict(SMALL_UNITS, **MIX_BUDGETS, nvme=tmp_path / f"spill-{name}")


def train(cls, tmp_path, name, data, resume=None, **overrides):
    extra = {"tierflow_options": options(tmp_path, name)} if issubclass(cls, TieredTrainer) else {}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        trainer = cls(model=make_tiny("gpt2"), args=training_args(tmp_path / name, **overrides),
                      train_dataset=data, **extra)
        trainer.losses, trainer.norms = [], []
        trainer.train(resume_from_checkpoint=resume)
    return trainer


@pytest.fixture
def closing():
    made = []
    yield made
    for trainer in made:
        if getattr(trainer, "engine", None) is not None:
            trainer.engine.close()


def logged(trainer, key):
    return [entry[key] for entry in trainer.state.log_history if key in entry and "train_runtime" not in entry]


def assert_moments_equal(plain, engine):
    """The reference's torch AdamW state against the engine's moments, bitwise."""
    torch_opt = plain.optimizer.optimizer  # accelerate's wrapper around torch.optim.AdamW
    got = engine.optimizer_state()
    for name, param in plain.model.named_parameters():
        state = torch_opt.state[param]
        assert got[name]["step"] == int(state["step"]), name
        assert torch.equal(got[name]["exp_avg"], state["exp_avg"]), f"exp_avg of {name}"
        assert torch.equal(got[name]["exp_avg_sq"], state["exp_avg_sq"]), f"exp_avg_sq of {name}"


@pytest.mark.parametrize("max_grad_norm", [0.0, 1.0])
@pytest.mark.parametrize("accum", [1, 2])
def test_trains_like_the_plain_trainer(tmp_path, closing, max_grad_norm, accum):
    data = dataset(STEPS * BATCH * accum)
    settings = dict(max_grad_norm=max_grad_norm, gradient_accumulation_steps=accum, optim="adamw_torch_fused")
    plain = train(PlainTrainer, tmp_path, "plain", data, **settings)
    tiered_trainer = train(TieredRecording, tmp_path, "tiered", data, **settings)
    closing.append(tiered_trainer)
    engine = tiered_trainer.engine
    assert set(engine.plan.homes) == {"device", "host", "nvme"}, engine.plan.homes
    assert engine.io_stats()["nvme_read"] > 0
    assert isinstance(tiered_trainer.optimizer.optimizer, tierflow.AdamW)
    assert len(plain.losses) == STEPS * accum and len(plain.norms) == STEPS
    assert_bitwise(plain.losses, tiered_trainer.losses, "losses")
    assert_bitwise(plain.norms, tiered_trainer.norms, "grad norms")
    assert logged(plain, "grad_norm") == logged(tiered_trainer, "grad_norm")
    assert logged(plain, "loss") == logged(tiered_trainer, "loss")
    assert logged(plain, "learning_rate") == logged(tiered_trainer, "learning_rate")
    assert min(logged(tiered_trainer, "grad_norm")) > 0.5  # really measured (not 0.0)
    if max_grad_norm:
        assert max(logged(plain, "grad_norm")) > max_grad_norm  # the clip really bites
    assert_state_bitwise(plain.model.state_dict(), engine.state_dict())
    assert_moments_equal(plain, engine)
    groups = tiered_trainer.optimizer.param_groups
    assert [g["weight_decay"] for g in groups] == [0.01, 0.0] and all(g["fused"] for g in groups)
    assert [len(g["params"]) for g in groups] == [len(g["params"]) for g in plain.optimizer.param_groups]


def test_unfused_adamw_matches_torch_default(tmp_path, closing):
    data = dataset(STEPS * BATCH)
    plain = train(PlainTrainer, tmp_path, "plain", data, optim="adamw_torch", max_grad_norm=1.0)
    tiered_trainer = train(TieredRecording, tmp_path, "tiered", data, optim="adamw_torch", max_grad_norm=1.0)
    closing.append(tiered_trainer)
    assert not any(g["fused"] for g in tiered_trainer.optimizer.param_groups)
    assert_bitwise(plain.losses, tiered_trainer.losses, "losses")
    assert_bitwise(plain.norms, tiered_trainer.norms, "grad norms")
    assert_state_bitwise(plain.model.state_dict(), tiered_trainer.engine.state_dict())
    # evaluation runs the model through the engine too
    held_out = dataset(STEPS * BATCH + 4)[-4:]
    assert plain.evaluate(held_out)["eval_loss"] == tiered_trainer.evaluate(held_out)["eval_loss"]


def test_resume_from_a_trainer_checkpoint_continues_exactly(tmp_path, closing):
    data = dataset(STEPS * BATCH * 2)
    settings = dict(max_grad_norm=1.0, gradient_accumulation_steps=2, save_strategy="steps", save_steps=2)
    whole = train(TieredRecording, tmp_path, "whole", data, **settings)
    closing.append(whole)
    checkpoint = tmp_path / "whole" / "checkpoint-2"
    assert (checkpoint / "tierflow" / "manifest.json").is_file()
    assert (checkpoint / "optimizer.pt").is_file() and (checkpoint / "scheduler.pt").is_file()
    saved_hyper = torch.load(checkpoint / "optimizer.pt", weights_only=True)
    assert saved_hyper["state"] == {} and len(saved_hyper["param_groups"]) == 2

    resumed = train(TieredRecording, tmp_path, "resumed", data, resume=str(checkpoint), **settings)
    closing.append(resumed)
    assert resumed.state.global_step == STEPS
    half = len(whole.losses) // 2
    assert_bitwise(whole.losses[half:], resumed.losses, "losses after resuming")
    assert_bitwise(whole.norms[STEPS // 2:], resumed.norms, "grad norms after resuming")
    assert logged(whole, "learning_rate")[STEPS // 2:] == logged(resumed, "learning_rate")[STEPS // 2:]
    assert_state_bitwise(whole.engine.state_dict(), resumed.engine.state_dict())
    whole_moments, resumed_moments = whole.engine.optimizer_state(), resumed.engine.optimizer_state()
    for name, value in whole_moments.items():
        assert value["step"] == resumed_moments[name]["step"] == STEPS
        assert torch.equal(value["exp_avg_sq"], resumed_moments[name]["exp_avg_sq"]), name

    # ... and it is the plain Trainer's run, with the final weights exported where Trainer puts them.
    plain = train(PlainTrainer, tmp_path, "plain", data, **settings)
    assert_bitwise(plain.losses, whole.losses, "losses")
    assert_state_bitwise(plain.model.state_dict(), resumed.engine.state_dict())
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        exported = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / "resumed" / f"checkpoint-{STEPS}")
    assert_state_bitwise(plain.model.state_dict(), exported.state_dict())


def test_settings_that_would_bypass_the_engine_are_refused(tmp_path):
    model = make_tiny("gpt2")
    with pytest.raises(tierflow.ConfigError, match="optim='sgd'"):
        TieredTrainer(model=model, args=training_args(tmp_path, optim="sgd"), train_dataset=dataset(2))
    opt = torch.optim.AdamW(model.parameters())
    with pytest.raises(tierflow.ConfigError, match="optimizers="):
        TieredTrainer(model=model, args=training_args(tmp_path), train_dataset=dataset(2), optimizers=(opt, None))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        recomputing = TieredTrainer(model=model, args=training_args(tmp_path, activation_checkpointing=True),
                                    train_dataset=dataset(2))
    assert recomputing.tierflow_options["activations"] == "recompute"  # the engine's own checkpointing
    assert not recomputing.args.activation_checkpointing
    with pytest.raises(tierflow.ConfigError, match="Trainer subclass"):
        tiered(torch.nn.Module)


def test_adamw_state_dict_holds_hyper_parameters_only(tmp_path, engines):
    engine = tierflow.offload(make_tiny("llama"), nvme=tmp_path / "spill")
    engines.append(engine)
    opt = tierflow.AdamW(engine, lr=1e-3)
    state = opt.state_dict()
    assert state["state"] == {} and state["param_groups"][0]["lr"] == 1e-3
    state["param_groups"][0]["lr"] = 5e-4
    opt.load_state_dict(state)
    assert opt.param_groups[0]["lr"] == 5e-4
    state["state"] = {0: {"step": torch.tensor(1.0)}}
    with pytest.raises(tierflow.ConfigError, match="hyper-parameters only"):
        opt.load_state_dict(state)


def tiny_tokenizer():
    tokenizers = pytest.importorskip("tokenizers")
    vocab = {f"t{i}": i for i in range(VOCAB)}
    tok = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="t1"))
    tok.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    return transformers.PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="t0", eos_token="t0",
                                                unk_token="t1")


def test_trl_sft_trainer_trains_through_tierflow(tmp_path, closing):
    trl = pytest.importorskip("trl")
    datasets = pytest.importorskip("datasets")
    from tierflow.integrations.transformers import TieredSFTTrainer

    texts = [" ".join(f"t{int(i)}" for i in ids[0]) for ids in make_batches(STEPS * BATCH, batch=1)]
    data = datasets.Dataset.from_dict({"text": texts})
    runs = []
    for cls in (type("PlainSFT", (Recording, trl.SFTTrainer), {}), type("TieredSFT", (Recording, TieredSFTTrainer), {})):
        config = trl.SFTConfig(output_dir=str(tmp_path / cls.__name__), max_steps=STEPS,
                               per_device_train_batch_size=BATCH, learning_rate=1e-2, logging_steps=1,
                               save_strategy="no", report_to=[], seed=42, use_cpu=True, disable_tqdm=True,
                               max_grad_norm=1.0, max_length=32)
        extra = {"tierflow_options": options(tmp_path, cls.__name__)} if cls.__name__ == "TieredSFT" else {}
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            trainer = cls(model=make_tiny("gpt2"), args=config, train_dataset=data,
                          processing_class=tiny_tokenizer(), **extra)
            trainer.losses, trainer.norms = [], []
            trainer.train()
        runs.append(trainer)
    plain, tiered_sft = runs
    closing.append(tiered_sft)
    assert isinstance(tiered_sft.optimizer.optimizer, tierflow.AdamW)
    assert set(tiered_sft.engine.plan.homes) == {"device", "host", "nvme"}
    assert plain.args.activation_checkpointing  # SFTConfig's default: torch.utils.checkpoint in the plain run,
    assert str(tiered_sft.engine.cfg.activations) == "recompute"  # the engine's recompute in the tiered one
    assert len(plain.losses) == STEPS
    assert_bitwise(plain.losses, tiered_sft.losses, "SFT losses")
    assert_bitwise(plain.norms, tiered_sft.norms, "SFT grad norms")
    assert_state_bitwise(plain.model.state_dict(), tiered_sft.engine.state_dict())
