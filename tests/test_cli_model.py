"""`tierflow train` with a Hugging Face model directory, resume and export, from the command line:

- `--model DIR` streams the weights into the tiers (peak RSS: the budgets plus a fixed overhead,
  not the model);
- a corrupt or incomplete model directory is one line, before any work, nothing written;
- `--resume RUN --steps N` extends the run; the checkpoint's budgets apply unless given;
- `--export` writes the tokenizer, and `generate` from the export gives the trained engine's tokens.
"""
from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import textwrap
import warnings
from pathlib import Path

import pytest
import torch

import tierflow
from tierflow.cli.main import EXIT_ERROR, main
from tierflow.data import ByteTokenizer


def hf_dir(path: Path, layers=1, hidden=32, vocab=320, shard="50MB") -> int:
    """A random Llama saved with save_pretrained (no tokenizer files); returns its fp32 bytes."""
    import transformers

    config = transformers.LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=4 * hidden,
                                      num_hidden_layers=layers, num_attention_heads=8, num_key_value_heads=8,
                                      max_position_embeddings=64, tie_word_embeddings=False)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = transformers.LlamaForCausalLM(config)
        model.save_pretrained(path, max_shard_size=shard)
    return sum(p.numel() * 4 for p in model.parameters())


@pytest.fixture
def data(tmp_path):
    path = tmp_path / "data.txt"
    path.write_text("".join(f"line {i}: the quick brown fox jumps over the lazy dog\n" for i in range(400)))
    return path


def small(data, tmp_path, *extra):
    return ["train", "--data", str(data), "--seq-len", "32", "--log-every", "0", "--device", "cpu",
            "--device-memory", "3MiB", "--host-memory", "4MiB", "--nvme", str(tmp_path / "spill"), *extra]


def tree(path: Path) -> dict:
    """Every file under `path` with its digest."""
    return {str(p.relative_to(path)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(path.rglob("*")) if p.is_file()}


# ---------------------------------------------------------------------------- streaming

_RSS_CHILD = textwrap.dedent("""
    import json, sys
    from tierflow.cli.main import main
    status = main(sys.argv[1:])
    peak = next(int(l.split()[1]) for l in open("/proc/self/status") if l.startswith("VmHWM:")) * 1024
    print(json.dumps({"status": status, "peak": peak}))
""")


def peak_rss_of_train(model: Path, data: Path, spill: Path, budget_mib: int) -> int:
    """VmHWM of a process running `tierflow train --model DIR --steps 1` (the whole CLI: imports,
    tokenizer, data, loading, one step, the summary)."""
    env = dict(PYTHONPATH=str(Path(tierflow.__file__).parent.parent), PATH="/usr/bin:/bin",
               XDG_CACHE_HOME=str(spill.parent / "cache"), OMP_NUM_THREADS="1")
    argv = ["train", "--model", str(model), "--data", str(data), "--steps", "1", "--seq-len", "16",
            "--log-every", "0", "--device", "cpu", "--device-memory", f"{budget_mib}MiB",
            "--host-memory", f"{budget_mib}MiB", "--nvme", str(spill)]
    out = subprocess.run([sys.executable, "-c", _RSS_CHILD, *argv], capture_output=True, text=True, env=env,
                         timeout=120)
    assert out.returncode == 0, out.stderr[-2000:]
    figures = json.loads(out.stdout.strip().splitlines()[-1])
    assert figures["status"] == 0, out.stdout[-2000:]
    return figures["peak"]


def test_train_from_a_model_directory_streams_it_into_the_tiers(tmp_path, data):
    """A 194 MiB Llama, 6x the 32 MiB host budget (and 32 MiB device budget, in RAM on a CPU).
    The fixed overhead is measured, not guessed: the same command with a 0.5 MiB model of the
    same family (torch + transformers imports, the model code, the tokenizer and data, the CLI).
    The big model may add only what the budgets allow plus 24 MiB (one step's activations are
    under 1 MiB at 1x16 tokens; the rest is allocator slack and the module objects).
    from_pretrained materialises all of it, then the engine copies it into the tiers: before
    streaming, the same command grew by more than the model (see the report in the assertion)."""
    budget = 32
    model_bytes = hf_dir(tmp_path / "big", layers=12, hidden=512)
    hf_dir(tmp_path / "tiny", layers=1, hidden=64)
    assert model_bytes > 6 * budget * 2**20
    overhead = peak_rss_of_train(tmp_path / "tiny", data, tmp_path / "spill-tiny", budget)
    peak = peak_rss_of_train(tmp_path / "big", data, tmp_path / "spill-big", budget)
    growth = peak - overhead
    report = (f"peak RSS {peak / 2**20:.0f} MiB with the {model_bytes / 2**20:.0f} MiB model, {overhead / 2**20:.0f} "
              f"MiB with a 0.5 MiB one: +{growth / 2**20:.0f} MiB")
    assert growth < (2 * budget + 24) * 2**20, report
    assert growth < model_bytes / 2, report  # from_pretrained alone would hold the whole model


# ---------------------------------------------------------------------------- bad model directories

def _corrupt_header(path: Path) -> None:
    raw = bytearray(path.read_bytes())
    raw[8:16] = b"#garbage"  # the header is no longer JSON
    path.write_bytes(bytes(raw))


def _truncate(path: Path) -> None:
    raw = path.read_bytes()
    path.write_bytes(raw[: len(raw) - 1000])


def _drop_index_shard(path: Path) -> None:
    (path / "model.safetensors.index.json").write_text(json.dumps(
        {"metadata": {}, "weight_map": {"x": "model-00009-of-00009.safetensors"}}))


@pytest.mark.parametrize("damage, words", [(_corrupt_header, "not valid JSON"), (_truncate, "truncated"),
                                           (_drop_index_shard, "missing")])
def test_corrupt_model_directory_is_one_line_before_any_work(tmp_path, data, capsys, damage, words):
    model = tmp_path / "hf"
    hf_dir(model)
    damage(model if damage is _drop_index_shard else model / "model.safetensors")
    out, export = tmp_path / "out", tmp_path / "export"
    capsys.readouterr()  # save_pretrained's progress bar
    flags = small(data, tmp_path, "--model", str(model), "--steps", "2", "--output", str(out), "--export",
                  str(export))
    assert main(flags) == EXIT_ERROR
    err = capsys.readouterr().err
    assert err.startswith("tierflow: error: ") and err.count("\n") == 1, err
    assert words in err and "Traceback" not in err, err
    assert not out.exists() and not export.exists() and not (tmp_path / "spill").exists()
    # Checked before the data: a missing data file is not what is reported.
    assert main(flags[:2] + [str(tmp_path / "no-such.txt")] + flags[3:]) == EXIT_ERROR
    assert words in capsys.readouterr().err


def test_train_from_a_model_directory_trains_and_exports(tmp_path, data, capsys):
    model = tmp_path / "hf"
    hf_dir(model, layers=2)
    export = tmp_path / "export"
    assert main(small(data, tmp_path, "--model", str(model), "--steps", "2", "--export", str(export))) == 0
    assert "exported to" in capsys.readouterr().out
    trained, start = tierflow.load(export, trainable=False), tierflow.load(model, trainable=False)
    try:
        after, before = trained.state_dict(), start.state_dict()
        assert set(after) == set(before) and all(after[k].shape == before[k].shape for k in before)
        assert any(not torch.equal(after[k], before[k]) for k in before), "the export holds the untrained weights"
    finally:
        trained.close()
        start.close()


# ---------------------------------------------------------------------------- resume

def _saved_args(out: Path) -> dict:
    from tierflow.checkpoint import read_manifest

    manifest = read_manifest(out / (out / "latest").read_text().strip())
    return {**manifest["extra"]["train"], "engine": manifest["engine"]["config"]}


def test_resume_with_more_steps_extends_the_run(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert main(small(data, tmp_path, "--model", "llama-tiny", "--steps", "5", "--output", str(out))) == 0
    capsys.readouterr()
    assert main(["train", "--resume", str(out), "--steps", "8", "--log-every", "1"]) == 0
    text = capsys.readouterr().out
    assert "nothing left to train" not in text
    assert "now ends at step 8" in text and "step 6/8" in text and "step 8/8" in text, text
    saved = _saved_args(out)
    assert saved["step"] == 8 and saved["args"]["steps"] == 8
    assert (out / "latest").read_text().strip() == "step-8"
    # Without --steps the saved total holds: nothing is left.
    assert main(["train", "--resume", str(out)]) == 0
    assert "nothing left to train" in capsys.readouterr().out


def test_resume_refuses_fewer_steps_and_changed_run_flags_before_any_work(tmp_path, data, capsys):
    out = tmp_path / "out"
    assert main(small(data, tmp_path, "--model", "llama-tiny", "--steps", "3", "--output", str(out))) == 0
    capsys.readouterr()
    before = tree(out)
    for flags, words in ((["--steps", "2"], "--steps 2 is below step 3"),
                         (["--seed", "5"], "--seed 5 differs"),
                         (["--lr", "0.5"], "--lr 0.5 differs")):
        assert main(["train", "--resume", str(out), *flags]) == EXIT_ERROR
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and words in err, err
    assert tree(out) == before
    # Repeating the saved run's flags is fine.
    assert main(small(data, tmp_path, "--model", "llama-tiny", "--steps", "3", "--resume", str(out))) == 0
    assert "nothing left to train" in capsys.readouterr().out


def test_resume_takes_the_saved_budgets_unless_given(tmp_path, data, capsys):
    out, spill = tmp_path / "out", tmp_path / "spill"
    assert main(small(data, tmp_path, "--model", "llama-tiny", "--steps", "2", "--output", str(out))) == 0
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    text = capsys.readouterr().out
    engine = _saved_args(out)["engine"]
    assert (engine["device_memory"], engine["host_memory"]) == (3 * 2**20, 4 * 2**20), engine
    assert engine["nvme"] == str(spill) and f"NVMe tier: {spill}" in text, text
    assert main(["train", "--resume", str(out), "--steps", "4", "--host-memory", "6MiB", "--dtype",
                 "bfloat16"]) == 0
    saved = _saved_args(out)
    assert (saved["engine"]["device_memory"], saved["engine"]["host_memory"]) == (3 * 2**20, 6 * 2**20)
    assert saved["engine"]["dtype"] == "bfloat16" and saved["settings"]["dtype"] == "bfloat16"
    assert saved["settings"]["nvme"] == str(spill)


def test_resume_of_a_run_with_a_temporary_nvme_directory_gets_a_new_one(tmp_path, data, monkeypatch, capsys):
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "cache"))
    out = tmp_path / "out"
    flags = [f for f in small(data, tmp_path, "--model", "llama-tiny", "--steps", "2", "--output", str(out))]
    at = flags.index("--nvme")
    del flags[at:at + 2]
    assert main(flags) == 0
    assert _saved_args(out)["settings"]["nvme"] is None
    assert main(["train", "--resume", str(out), "--steps", "3"]) == 0
    assert list((tmp_path / "cache" / "tierflow").glob("train-*")) == []  # the new temporary one is gone too


# ---------------------------------------------------------------------------- export and generate

def test_export_writes_the_tokenizer_and_generate_gives_the_trained_tokens(tmp_path, data, capsys):
    from transformers import AutoTokenizer

    out, export = tmp_path / "out", tmp_path / "export"
    assert main(small(data, tmp_path, "--model", "llama-tiny", "--steps", "3", "--output", str(out),
                      "--export", str(export))) == 0
    assert (export / "tokenizer.json").is_file()
    text = "def main():\n\treturn 'é'"
    hf = AutoTokenizer.from_pretrained(export)  # a plain transformers user gets the same ids
    assert hf.encode(text, add_special_tokens=False) == ByteTokenizer().encode(text)
    capsys.readouterr()

    prompts = ["the quick", "line 3"]
    argv = ["generate", "--model", str(export), "--max-new-tokens", "8", "--nvme", str(tmp_path / "gen"),
            "--device-memory", "3MiB", "--host-memory", "4MiB"]
    assert main(argv + [x for p in prompts for x in ("--prompt", p)]) == 0
    printed, err = capsys.readouterr()
    assert "tokenizer: bytes" in err, err

    tok = ByteTokenizer()
    engine, _ = tierflow.resume(out, device="cpu")  # the trained engine, as the run left it
    try:
        engine.module.eval()
        width = max(len(tok.encode(p)) for p in prompts)
        ids = torch.full((2, width), tok.pad_id, dtype=torch.long)
        mask = torch.zeros_like(ids)
        for row, p in enumerate(prompts):
            ids[row, width - len(tok.encode(p)):] = torch.tensor(tok.encode(p))
            mask[row, width - len(tok.encode(p)):] = 1
        expected = engine.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                   pad_token_id=tok.pad_id)[:, width:]
    finally:
        engine.close()
    exported = tierflow.load(export, trainable=False, nvme=tmp_path / "gen2")
    try:
        got = exported.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False,
                                pad_token_id=tok.pad_id)[:, width:]
    finally:
        exported.close()
    assert torch.equal(got, expected)
    for row, p in enumerate(prompts):
        assert f"[{row}] {p}{tok.decode(expected[row].tolist())}" in printed


def test_export_of_a_model_with_its_own_tokenizer(tmp_path, data, capsys):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    model = tmp_path / "hf"
    hf_dir(model, vocab=64)
    words = ["[UNK]", "<s>", "</s>", "<pad>", "line", "the", "quick", "brown", "fox", ":"]
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel({w: i for i, w in enumerate(words)}, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="<s>", eos_token="</s>",
                            pad_token="<pad>").save_pretrained(model)
    export = tmp_path / "export"
    assert main(small(data, tmp_path, "--model", str(model), "--steps", "1", "--export", str(export))) == 0
    assert (export / "tokenizer.json").is_file()
    capsys.readouterr()
    assert main(["generate", "--model", str(export), "--prompt", "the quick", "--max-new-tokens", "3",
                 "--nvme", str(tmp_path / "gen")]) == 0
    assert f"from {export}" in capsys.readouterr().err


def test_generate_refuses_a_tokenizer_bigger_than_the_vocabulary(tmp_path, capsys):
    model = tmp_path / "hf"
    hf_dir(model, vocab=200)
    ByteTokenizer().save_pretrained(tmp_path / "bytes-tok")  # 259 tokens
    capsys.readouterr()
    assert main(["generate", "--model", str(model), "--prompt", "x", "--tokenizer",
                 str(tmp_path / "bytes-tok")]) == EXIT_ERROR
    err = capsys.readouterr().err
    assert "more tokens than the model's vocabulary (200" in err and err.count("\n") == 1, err
    assert main(["generate", "--model", str(model), "--prompt", "x", "--tokenizer", str(tmp_path)]) == EXIT_ERROR
    assert "holds no tokenizer files" in capsys.readouterr().err
