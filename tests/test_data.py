"""Built-in data (tierflow.data) and built-in models (tierflow.models); fast, no engine."""

from __future__ import annotations

import json
import sysconfig
from itertools import islice
from pathlib import Path

import pytest
import torch

from tierflow.data import (BYTE_VOCAB_PADDED, ByteTokenizer, HFTokenizer, load_tokenizer, stdlib_text_files,
                           text_batches)
from tierflow.errors import ConfigError
from tierflow.models import build_model, builtin_config, builtin_names, parameter_count

TOK = ByteTokenizer()


def _write(path: Path, text: str) -> Path:
    path.write_text(text, encoding="utf-8")
    return path


# --- data -------------------------------------------------------------------------------------


def test_stdlib_files_are_sorted_python_sources_without_site_packages():
    files = stdlib_text_files()
    root = Path(sysconfig.get_paths()["stdlib"])
    assert len(files) > 100
    assert files == sorted(files) == stdlib_text_files()
    assert all(f.suffix == ".py" and root in f.parents for f in files)
    assert not any("site-packages" in f.parts or "__pycache__" in f.parts for f in files)


def test_byte_tokenizer_round_trip_and_vocab():
    ids = TOK.encode("héllo\n")
    assert ids == list("héllo\n".encode())
    assert TOK.decode([TOK.bos_id, *ids, TOK.eos_id]) == "héllo\n"
    assert {TOK.bos_id, TOK.eos_id, TOK.pad_id} == {256, 257, 258}
    assert TOK.vocab_size == 259 <= BYTE_VOCAB_PADDED


def test_stdlib_batches_shape_and_labels():
    batch = next(text_batches(None, TOK, batch_size=2, seq_len=64, seed=0))
    assert set(batch) == {"input_ids", "attention_mask", "labels"}
    for tensor in batch.values():
        assert tensor.shape == (2, 64) and tensor.dtype == torch.long
    assert batch["attention_mask"].all()
    assert torch.equal(batch["labels"], batch["input_ids"])
    assert int(batch["input_ids"].max()) < TOK.vocab_size


def test_batches_are_deterministic_given_seed():
    def first(seed):
        return [b["input_ids"] for b in islice(text_batches("stdlib", TOK, 2, 32, seed=seed), 3)]

    assert all(torch.equal(a, b) for a, b in zip(first(1), first(1)))
    assert not all(torch.equal(a, b) for a, b in zip(first(1), first(2)))


def test_text_file_one_pass_covers_all_bytes_and_pads_the_tail(tmp_path):
    text = "line one\nline two\n" * 5
    batches = list(text_batches(_write(tmp_path / "a.txt", text), TOK, 2, 16, repeat=False))
    ids = torch.cat([b["input_ids"][b["attention_mask"].bool()] for b in batches]).tolist()
    assert ids == [TOK.bos_id, *TOK.encode(text), TOK.eos_id]
    last = batches[-1]
    padded = last["attention_mask"] == 0
    assert padded.any()
    assert (last["labels"][padded] == -100).all() and (last["input_ids"][padded] == TOK.pad_id).all()


def test_tiny_file_repeats_forever(tmp_path):
    path = _write(tmp_path / "tiny.txt", "abc")
    batches = list(islice(text_batches(path, TOK, 4, 8, seed=0), 5))
    assert len(batches) == 5 and all(b["attention_mask"].all() for b in batches)


def test_jsonl_uses_text_field(tmp_path):
    lines = [json.dumps({"text": t, "id": i}) for i, t in enumerate(["alpha", "beta", "gamma"])]
    path = _write(tmp_path / "d.jsonl", "\n".join(lines) + "\n\n")
    batches = list(text_batches(path, TOK, 1, 8, seed=3, repeat=False))
    text = TOK.decode(torch.cat([b["input_ids"][0] for b in batches]).tolist())
    assert all(word in text for word in ("alpha", "beta", "gamma"))


@pytest.mark.parametrize("content, match", [
    ('{"body": "no text field"}\n', '"text"'),
    ('{"text": 3}\n', '"text"'),
    ("not json\n", "not valid JSON"),
    ("", "no text"),
])
def test_bad_jsonl_is_a_config_error(tmp_path, content, match):
    path = _write(tmp_path / "bad.jsonl", content)
    with pytest.raises(ConfigError, match=match):
        next(text_batches(path, TOK, 1, 8))


def test_missing_or_empty_data_is_a_config_error(tmp_path):
    with pytest.raises(ConfigError, match="not found"):
        text_batches(tmp_path / "missing.txt", TOK, 1, 8)  # raised before the first batch
    with pytest.raises(ConfigError, match="directory"):
        text_batches(tmp_path, TOK, 1, 8)
    with pytest.raises(ConfigError, match="no text"):
        next(text_batches(_write(tmp_path / "empty.txt", ""), TOK, 1, 8))
    with pytest.raises(ConfigError):
        text_batches(None, TOK, 0, 8)


def test_load_tokenizer_falls_back_to_bytes(tmp_path):
    assert isinstance(load_tokenizer(None), ByteTokenizer)
    assert isinstance(load_tokenizer("llama-tiny"), ByteTokenizer)
    assert isinstance(load_tokenizer(tmp_path), ByteTokenizer)  # a directory without tokenizer files


def test_load_tokenizer_from_local_hf_dir(tmp_path):
    tokenizers = pytest.importorskip("tokenizers")
    from transformers import PreTrainedTokenizerFast

    vocab = {"[UNK]": 0, "<s>": 1, "</s>": 2, "<pad>": 3, "hello": 4, "world": 5}
    raw = tokenizers.Tokenizer(tokenizers.models.WordLevel(vocab, unk_token="[UNK]"))
    raw.pre_tokenizer = tokenizers.pre_tokenizers.Whitespace()
    fast = PreTrainedTokenizerFast(tokenizer_object=raw, unk_token="[UNK]", bos_token="<s>",
                                   eos_token="</s>", pad_token="<pad>")
    fast.save_pretrained(tmp_path)
    tok = load_tokenizer(tmp_path)
    assert isinstance(tok, HFTokenizer)
    assert tok.encode("hello world nope") == [4, 5, 0]
    assert (tok.bos_id, tok.eos_id, tok.pad_id, tok.vocab_size) == (1, 2, 3, 6)
    batch = next(text_batches(_write(tmp_path / "t.txt", "hello world"), tok, 1, 6, repeat=False))
    assert batch["input_ids"][0].tolist() == [1, 4, 5, 2, 3, 3]
    assert batch["labels"][0].tolist() == [1, 4, 5, 2, -100, -100]


# --- models -----------------------------------------------------------------------------------


def _meta_params(name: str) -> int:
    from transformers import AutoModelForCausalLM

    with torch.device("meta"):
        return parameter_count(AutoModelForCausalLM.from_config(builtin_config(name)))


def test_builtin_sizes():
    assert set(builtin_names()) >= {"llama-100m", "llama-tiny", "gpt2-tiny"}
    assert 90e6 < _meta_params("llama-100m") < 110e6
    assert _meta_params("llama-tiny") < 1e6 and _meta_params("gpt2-tiny") < 1e6
    for name in builtin_names():
        assert builtin_config(name).vocab_size == BYTE_VOCAB_PADDED


def test_build_model_is_seeded_and_leaves_global_rng_alone():
    state = torch.random.get_rng_state()
    a, b, c = build_model("gpt2-tiny"), build_model("gpt2-tiny"), build_model("gpt2-tiny", seed=1)
    assert torch.equal(state, torch.random.get_rng_state())
    pa, pb, pc = (dict(m.named_parameters()) for m in (a, b, c))
    assert all(torch.equal(pa[k], pb[k]) for k in pa)
    assert not all(torch.equal(pa[k], pc[k]) for k in pa)
    assert a.lm_head.weight is a.transformer.wte.weight  # tied embeddings


def test_build_model_dtype():
    assert build_model("llama-tiny", dtype=torch.bfloat16).dtype == torch.bfloat16


def test_build_model_from_local_dir_round_trip(tmp_path):
    model = build_model("llama-tiny")
    model.save_pretrained(tmp_path)
    loaded = build_model(tmp_path)
    expected = model.state_dict()
    assert all(torch.equal(v, expected[k]) for k, v in loaded.state_dict().items())
    batch = next(text_batches(None, TOK, 2, 16))
    assert torch.isfinite(loaded(**batch).loss)


def test_bad_model_names_are_config_errors(tmp_path):
    with pytest.raises(ConfigError, match="built-in"):
        build_model("llama-nope")
    with pytest.raises(ConfigError, match="no config.json"):
        build_model(tmp_path)
    with pytest.raises(ConfigError, match="unknown built-in"):
        builtin_config("nope")
