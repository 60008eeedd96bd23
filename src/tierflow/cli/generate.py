"""Generate text with a model bigger than device and host memory.

    tierflow generate --model path/to/hf-model --prompt "def main(" --max-new-tokens 32 \\
                      --device-memory 512MiB --host-memory 1GiB --nvme /mnt/nvme/tierflow

The model directory (config.json + safetensors shards, and its tokenizer if it has one) is
loaded tensor by tensor straight into the
tiers the budgets give, never whole in memory. Weights that fit stay resident; the rest
stream from NVMe ahead of use. Tokens are printed as they are generated (one prompt),
then a summary: tokens/s and bytes read per tier. Decoding is greedy unless --sample.
Several --prompt flags make one batch (each layer's weights serve every sequence).

The tokenizer used is printed (on stderr) first: the model directory's own (``tierflow train
--export`` writes it), the one ``--tokenizer`` names, or bytes. A directory without tokenizer
files is tokenized as bytes only when its vocabulary is the byte vocabulary of tierflow's
built-in models (259-320 entries) or with ``--tokenizer bytes``; otherwise generate refuses
rather than print text decoded with the wrong tokenizer.
"""
from __future__ import annotations

import shutil
import sys
import tempfile

HELP = "generate text with a model bigger than device and host memory"


def add_arguments(parser) -> None:
    parser.add_argument("--model", required=True,
                        help="a local Hugging Face model directory, or a built-in model name")
    parser.add_argument("--prompt", action="append", required=True,
                        help="prompt text (repeat the flag for a batch of prompts)")
    parser.add_argument("--max-new-tokens", type=int, default=32, help="tokens to generate (default 32)")
    parser.add_argument("--device", default="cpu", help="compute device: cpu or cuda (default cpu)")
    parser.add_argument("--device-memory", default="512MiB", help="device budget (default 512MiB; 'none': no limit)")
    parser.add_argument("--host-memory", default="1GiB", help="host budget (default 1GiB; 'none': no limit)")
    parser.add_argument("--nvme", default=None,
                        help="spill directory (default: a temporary directory, removed at exit; 'none': off)")
    parser.add_argument("--dtype", default=None, help="compute dtype: float32, bfloat16, float16 (default: the model's)")
    parser.add_argument("--weights", default=None, choices=("int8", "int4"),
                        help="keep the weights compressed in host memory and on NVMe, dequantized on the "
                             "device before use: int8 or int4 (NF4), group-wise (default: uncompressed)")
    parser.add_argument("--kv-cache", default="auto", choices=("auto", "device", "host", "nvme"),
                        help="where the KV cache lives (default: by the budgets)")
    parser.add_argument("--tokenizer", default=None, metavar="DIR|bytes",
                        help="the tokenizer: a directory with Hugging Face tokenizer files, or 'bytes' "
                             "(default: the model directory's own)")
    parser.add_argument("--sample", action="store_true", help="sample instead of greedy decoding")
    parser.add_argument("--seed", type=int, default=0, help="seed for --sample (default 0)")


def run(args) -> int:
    import torch

    import tierflow
    from tierflow.errors import ConfigError
    from tierflow.infer.generate import summary_lines

    if args.max_new_tokens < 1:
        raise ConfigError("--max-new-tokens must be at least 1")
    vocab = _vocab_size(args.model)
    tokenizer = _tokenizer(args.model, args.tokenizer, vocab)
    print(f"tokenizer: {tokenizer.describe()}", file=sys.stderr)
    prompts = [tokenizer.encode(p) for p in args.prompt]
    if any(not p for p in prompts):
        raise ConfigError("every --prompt must have at least one token")
    if vocab is not None and max(max(p) for p in prompts) >= vocab:
        raise ConfigError(f"the prompt has token ids up to {max(max(p) for p in prompts)}, but the model's "
                          f"vocabulary has {vocab} entries: give the model's own tokenizer with --tokenizer DIR")
    pad = tokenizer.pad_id if vocab is None or tokenizer.pad_id < vocab else 0  # masked out anyway
    nvme, temporary = _nvme_dir(args.nvme)
    budgets = dict(device=args.device, device_memory=_budget(args.device_memory),
                   host_memory=_budget(args.host_memory), nvme=nvme, dtype=args.dtype,
                   weights=args.weights)
    engine = None
    try:
        engine = _load(args.model, budgets)
        ids, mask = _left_padded(prompts, pad)
        streamer = _Printer(tokenizer) if len(prompts) == 1 else None
        torch.manual_seed(args.seed)
        out = engine.generate(ids, attention_mask=mask, max_new_tokens=args.max_new_tokens,
                              do_sample=args.sample, pad_token_id=pad, streamer=streamer,
                              kv_cache=args.kv_cache)
        if streamer is None:
            for i, row in enumerate(out[:, ids.shape[1]:].tolist()):
                print(f"[{i}] {args.prompt[i]}{tokenizer.decode(row)}")
        report = engine.last_generation
        for line in summary_lines(engine, report):
            print(line)
        peaks = engine.budget_peaks()
        print("budget peaks: " + ", ".join(f"{tier} {tierflow.format_size(peak)}"
                                           + (f" of {tierflow.format_size(cap)}" if cap else "")
                                           for tier, (peak, cap) in peaks.items()))
    finally:
        if engine is not None:
            engine.close()
        if temporary:
            shutil.rmtree(nvme, ignore_errors=True)
    return 0


def _tokenizer(model: str, choice: str | None, vocab: int | None):
    """The tokenizer ``--tokenizer`` names, else the model's; refuses to fall back to bytes for a
    model whose vocabulary is not the byte vocabulary, and a tokenizer bigger than the model's
    vocabulary."""
    from tierflow.data import BYTE_VOCAB_PADDED, ByteTokenizer, has_tokenizer, load_tokenizer
    from tierflow.errors import ConfigError
    from tierflow.models import is_builtin

    if choice is not None and choice.lower() == "bytes":
        return ByteTokenizer()
    if choice is not None:
        if not has_tokenizer(choice):
            raise ConfigError(f"--tokenizer {choice} holds no tokenizer files (tokenizer.json, "
                              f"tokenizer_config.json, tokenizer.model or vocab.json): give such a directory, or 'bytes'")
        tokenizer = load_tokenizer(choice)
    elif is_builtin(model):
        return ByteTokenizer()
    elif has_tokenizer(model):
        tokenizer = load_tokenizer(model)
    else:
        if vocab is not None and not ByteTokenizer.vocab_size <= vocab <= BYTE_VOCAB_PADDED:
            raise ConfigError(f"{model} has no tokenizer files and its vocabulary ({vocab} entries) is not the "
                              f"byte vocabulary ({ByteTokenizer.vocab_size}-{BYTE_VOCAB_PADDED}): give its "
                              f"tokenizer with --tokenizer DIR, or --tokenizer bytes to tokenize as bytes anyway")
        return ByteTokenizer()
    if vocab is not None and tokenizer.vocab_size > vocab:
        raise ConfigError(f"the tokenizer ({tokenizer.describe()}) has more tokens than the model's vocabulary "
                          f"({vocab} entries): it is not this model's tokenizer; give the right one with "
                          f"--tokenizer DIR")
    return tokenizer


def _load(model: str, budgets: dict):
    """A frozen engine over a model directory (streamed in) or a built-in model."""
    import tierflow
    from tierflow.models import build_model, is_builtin

    if is_builtin(model):
        module = build_model(model).eval().requires_grad_(False)
        return tierflow.offload(module, **budgets)
    return tierflow.load(model, trainable=False, **budgets)


def _vocab_size(model: str):
    """The vocabulary size in the model's config (None when it cannot be read here; loading
    reports that)."""
    import json
    from pathlib import Path

    from tierflow.models import builtin_config, is_builtin

    if is_builtin(model):
        return builtin_config(model).vocab_size
    try:
        config = json.loads((Path(model) / "config.json").read_text())
    except (OSError, ValueError):
        return None
    return config.get("vocab_size") or config.get("text_config", {}).get("vocab_size")


def _left_padded(prompts: list[list[int]], pad: int):
    """Batch of prompts padded on the left (generation continues every row at its end)."""
    import torch

    width = max(len(p) for p in prompts)
    ids = torch.full((len(prompts), width), pad, dtype=torch.long)
    mask = torch.zeros_like(ids)
    for row, prompt in enumerate(prompts):
        ids[row, width - len(prompt):] = torch.tensor(prompt)
        mask[row, width - len(prompt):] = 1
    return ids, mask


def _budget(value):
    return None if value is None or str(value).lower() == "none" else value


def _nvme_dir(value):
    if value is not None and str(value).lower() == "none":
        return None, False
    if value is None:
        return tempfile.mkdtemp(prefix="tierflow-generate-"), True
    return value, False


class _Printer:
    """A transformers streamer printing the new text of one sequence as it is generated."""

    def __init__(self, tokenizer):
        self.tokenizer, self.ids, self.printed, self.prompt_seen = tokenizer, [], "", False

    def put(self, value) -> None:
        if not self.prompt_seen:  # generate passes the prompt first
            self.prompt_seen = True
            return
        self.ids.extend(value.reshape(-1).tolist())
        text = self.tokenizer.decode(self.ids)
        sys.stdout.write(text[len(self.printed):])
        sys.stdout.flush()
        self.printed = text

    def end(self) -> None:
        sys.stdout.write("\n")
        sys.stdout.flush()
