"""Built-in model configs and a single entry point to build a causal LM.

The built-in models use the byte vocabulary of :mod:`tierflow.data`
(:data:`~tierflow.data.BYTE_VOCAB_PADDED` rows), start from a random
initialisation drawn from a fixed seed, and need no download:

=============  ==========  =====================================================
name           parameters  use
=============  ==========  =====================================================
``llama-100m``  ~99.6 M     the default of ``tierflow train`` (hidden 768, 14 layers)
``llama-tiny``  ~0.41 M     tests (hidden 128, 2 layers)
``gpt2-tiny``   ~0.50 M     tests, tied input/output embeddings (hidden 128, 2 layers)
=============  ==========  =====================================================
"""

from __future__ import annotations

import os
from pathlib import Path

import torch

from tierflow.data import BYTE_VOCAB_PADDED
from tierflow.errors import ConfigError

DEFAULT_MODEL = "llama-100m"


def _llama(hidden: int, layers: int, intermediate: int, heads: int):
    """A Llama config over the byte vocabulary."""
    from transformers import LlamaConfig

    return LlamaConfig(
        vocab_size=BYTE_VOCAB_PADDED,
        hidden_size=hidden,
        intermediate_size=intermediate,
        num_hidden_layers=layers,
        num_attention_heads=heads,
        num_key_value_heads=heads,
        max_position_embeddings=2048,
        tie_word_embeddings=False,
        use_cache=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )


def _gpt2(hidden: int, layers: int, heads: int):
    """A GPT-2 config over the byte vocabulary (tied embeddings)."""
    from transformers import GPT2Config

    return GPT2Config(
        vocab_size=BYTE_VOCAB_PADDED,
        n_embd=hidden,
        n_layer=layers,
        n_head=heads,
        n_positions=512,
        tie_word_embeddings=True,
        use_cache=False,
        bos_token_id=256,
        eos_token_id=257,
        pad_token_id=258,
    )


_BUILTIN = {
    "llama-100m": lambda: _llama(hidden=768, layers=14, intermediate=2048, heads=12),
    "llama-tiny": lambda: _llama(hidden=128, layers=2, intermediate=256, heads=4),
    "gpt2-tiny": lambda: _gpt2(hidden=128, layers=2, heads=4),
}


def builtin_names() -> list[str]:
    """Names accepted by :func:`builtin_config`."""
    return sorted(_BUILTIN)


def builtin_config(name: str = DEFAULT_MODEL):
    """The ``transformers`` config of built-in model ``name``."""
    try:
        make = _BUILTIN[name]
    except KeyError:
        raise ConfigError(
            f"unknown built-in model {name!r}; choose one of {', '.join(builtin_names())} "
            "or give a local Hugging Face model directory"
        ) from None
    return make()


def is_builtin(name_or_path: str | os.PathLike) -> bool:
    """Whether ``name_or_path`` names a built-in model."""
    return str(name_or_path) in _BUILTIN


def build_model(name_or_path: str | os.PathLike = DEFAULT_MODEL, dtype: torch.dtype | None = None, seed: int = 0):
    """A causal LM from a built-in name or a local Hugging Face model directory.

    A built-in name gives a randomly initialised model whose weights depend
    only on ``seed`` (the global RNG state is left untouched). A directory is
    loaded with ``from_pretrained(..., local_files_only=True)``. ``dtype``
    casts the parameters (``None`` keeps float32 / the checkpoint's dtype).
    """
    from transformers import AutoModelForCausalLM

    if is_builtin(name_or_path):
        config = builtin_config(str(name_or_path))
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(seed)
            model = AutoModelForCausalLM.from_config(config)
        return model.to(dtype) if dtype is not None else model
    path = model_dir(name_or_path)
    os.environ.setdefault("HF_HUB_OFFLINE", "1")
    kwargs = {_dtype_kwarg(): dtype} if dtype is not None else {}
    try:
        model = AutoModelForCausalLM.from_pretrained(str(path), local_files_only=True, **kwargs)
    except (OSError, ValueError, KeyError) as exc:
        raise ConfigError(f"cannot load a causal LM from {path}: {exc}") from exc
    model.config.use_cache = False  # training: no KV cache
    return model


def model_dir(name_or_path: str | os.PathLike) -> Path:
    """The model directory ``name_or_path`` names, or a ConfigError."""
    path = Path(name_or_path)
    if not path.exists():
        raise ConfigError(
            f"model {str(name_or_path)!r} is neither a built-in model ({', '.join(builtin_names())}) "
            "nor an existing directory"
        )
    if not path.is_dir() or not (path / "config.json").is_file():
        raise ConfigError(f"{path} is not a Hugging Face model directory (no config.json)")
    return path


def _dtype_kwarg() -> str:
    """``from_pretrained``'s dtype keyword: ``dtype`` on new transformers, else ``torch_dtype``."""
    import transformers

    major, minor = (int(x) for x in transformers.__version__.split(".")[:2])
    return "dtype" if (major, minor) >= (4, 56) else "torch_dtype"


def parameter_count(model: torch.nn.Module) -> int:
    """Distinct parameters of ``model`` (tied weights counted once)."""
    return sum(p.numel() for p in model.parameters())
