"""A key/value cache for `generate` whose layers live in a tier: device, host or NVMe.

`TieredCache` is a transformers `Cache`: `generate` and the attention layers use it as
they use `DynamicCache`, and the keys/values they get are bitwise the same (a layer's
past is concatenated with the new states, as `DynamicLayer.update` does).

* device: each layer's keys/values stay where the model computes (`DynamicCache`).
* host: the past of a layer lives in host memory; on CUDA it is copied to the device
  one layer ahead of use, on a thread (on the CPU host memory is device memory, so
  nothing moves; the bytes count against the host budget).
* nvme: the past of a layer lives in a file, token-major ([seq, batch, heads, dim]) so
  that a decode step appends one slab per layer and reads the past in one request;
  the next layer's past is read ahead on a thread while this layer computes. The
  file is unlinked as soon as it is open: nothing is left behind, even after a crash.

Only full-attention models have a `TieredCache` (sliding-window and linear-attention
layers keep transformers' own cache; see infer.py).
"""
from __future__ import annotations

import os
from concurrent.futures import Future, ThreadPoolExecutor

import torch
from transformers.cache_utils import Cache, DynamicLayer

from tierflow.errors import ConfigError
from tierflow.memory.spill import open_scratch_file

KV_TIERS = ("device", "host", "nvme")


class TieredLayer(DynamicLayer):
    """A full-attention layer whose past is kept by a `_Store`; only the length stays here."""

    is_croppable = False

    def __init__(self):
        super().__init__()
        self.length = 0

    def get_seq_length(self) -> int:
        return self.length

    def reset(self) -> None:
        super().reset()
        self.length = 0


class TieredCache(Cache):
    """transformers Cache over `layers` full-attention layers whose past lives in `tier`.

    `capacity`: the most tokens a sequence reaches (prompt + new tokens); the NVMe
    tier sizes its file regions by it. `nvme_dir`: where the NVMe tier's file goes."""

    def __init__(self, layers: int, tier: str, capacity: int, nvme_dir=None):
        if tier not in KV_TIERS:
            raise ConfigError(f"unknown KV cache tier {tier!r}: use one of {', '.join(KV_TIERS)}")
        self.tier = tier
        super().__init__(layers=[TieredLayer() for _ in range(layers)])
        self.store = (_DeviceStore() if tier == "device" else
                      _HostStore() if tier == "host" else _NvmeStore(layers, capacity, nvme_dir))

    def update(self, key_states, value_states, layer_idx: int, *args, **kwargs):
        layer = self.layers[layer_idx]
        if not layer.is_initialized:
            layer.lazy_initialization(key_states, value_states)
        past = self.store.take(layer_idx, layer.length, key_states)
        if past is None:
            keys, values = key_states, value_states
        else:  # the same concatenation as DynamicLayer.update: bitwise the same keys/values
            keys = torch.cat([past[0], key_states], dim=-2)
            values = torch.cat([past[1], value_states], dim=-2)
        self.store.put(layer_idx, layer.length, keys, values, key_states, value_states)
        layer.length = keys.shape[-2]
        following = (layer_idx + 1) % len(self.layers)  # wraps: layer 0 of the next step
        self.store.prefetch(following, self.layers[following].length)
        return keys, values

    def reorder_cache(self, beam_idx):
        raise ConfigError("beam search is not supported with tierflow's tiered KV cache: pass "
                          "kv_cache='device' or num_beams=1")

    def bytes_read(self) -> int:
        return self.store.bytes_read

    def bytes_written(self) -> int:
        return self.store.bytes_written

    def close(self) -> None:
        self.store.close()


class _DeviceStore:
    """Keys/values stay on the compute device, as in DynamicCache."""

    bytes_read = bytes_written = 0

    def __init__(self):
        self.kv: dict[int, tuple] = {}

    def take(self, index, length, like):
        return self.kv.get(index)

    def put(self, index, length, keys, values, new_keys, new_values):
        self.kv[index] = (keys, values)

    def prefetch(self, index, length):
        pass

    def close(self):
        self.kv.clear()


class _HostStore(_DeviceStore):
    """Past keys/values in host memory; on CUDA the next layer is copied up ahead of use."""

    def __init__(self):
        super().__init__()
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tierflow-kv")
        self._ahead: dict[int, Future] = {}
        self.device = torch.device("cpu")

    def take(self, index, length, like):
        if index not in self.kv:
            return None
        future = self._ahead.pop(index, None)
        if future is not None:
            return future.result()
        return _to(self.kv[index], like.device)

    def put(self, index, length, keys, values, new_keys, new_values):
        self.device = keys.device
        if keys.device.type == "cpu":
            self.kv[index] = (keys, values)
            return
        old = self.kv.get(index)  # only the new part crosses to the host
        new = (new_keys.to("cpu"), new_values.to("cpu"))
        self.kv[index] = new if old is None else tuple(torch.cat([o, n], dim=-2) for o, n in zip(old, new))
        self.bytes_written += sum(t.numel() * t.element_size() for t in new)

    def prefetch(self, index, length):
        past = self.kv.get(index)
        if past is None or self.device.type == "cpu":
            return
        self.bytes_read += sum(t.numel() * t.element_size() for t in past)
        self._ahead[index] = self._thread.submit(_to, past, self.device)

    def close(self):
        self._thread.shutdown(wait=True)
        super().close()


def _to(pair, device):
    if pair[0].device == device:
        return pair
    return tuple(t.to(device, non_blocking=False) for t in pair)


class _NvmeStore:
    """Past keys/values of every layer in one unlinked file; each layer has a region of
    `capacity` tokens for keys and one for values, token-major."""

    def __init__(self, layers: int, capacity: int, nvme_dir):
        if nvme_dir is None:
            raise ConfigError("kv_cache='nvme' needs an NVMe directory: pass nvme=DIR")
        self.fd, _ = open_scratch_file(nvme_dir, "kv")  # unlinked: nothing is left behind
        self.layers, self.capacity = layers, capacity
        self.slab = None  # (batch, heads, dim, dtype) of one token, known at the first update
        self._thread = ThreadPoolExecutor(1, thread_name_prefix="tierflow-kv")  # FIFO: reads follow writes
        self._ahead: dict[int, tuple[int, Future]] = {}
        self.bytes_read = self.bytes_written = 0

    def _region(self, index: int, which: int) -> int:
        batch, heads, dim, dtype = self.slab
        return (2 * index + which) * self.capacity * batch * heads * dim * dtype.itemsize

    def take(self, index, length, like):
        if length == 0:
            return None
        ahead = self._ahead.pop(index, None)
        future = ahead[1] if ahead is not None and ahead[0] == length else self._thread.submit(
            self._read, index, length)
        keys, values = future.result()
        return keys.to(like.device), values.to(like.device)

    def put(self, index, length, keys, values, new_keys, new_values):
        batch, heads, tokens, dim = new_keys.shape
        if self.slab is None:
            self.slab = (batch, heads, dim, new_keys.dtype)
        if length + tokens > self.capacity:
            raise ConfigError(f"the NVMe KV cache was sized for {self.capacity} tokens; the sequence "
                              f"reached {length + tokens}")
        # Token-major on disk: appending a step is one write per layer, reading the past one read.
        for which, new in enumerate((new_keys, new_values)):
            data = new.detach().permute(2, 0, 1, 3).contiguous().cpu()
            offset = self._region(index, which) + length * _token_bytes(self.slab)
            self._thread.submit(_pwrite, self.fd, data, offset)
            self.bytes_written += data.numel() * data.element_size()

    def prefetch(self, index, length):
        if length and self.slab is not None:
            self._ahead[index] = (length, self._thread.submit(self._read, index, length))

    def _read(self, index: int, length: int):
        batch, heads, dim, dtype = self.slab
        out = []
        for which in (0, 1):
            buf = torch.empty(length * _token_bytes(self.slab), dtype=torch.uint8)
            _pread(self.fd, buf, self._region(index, which))
            out.append(buf.view(dtype).view(length, batch, heads, dim).permute(1, 2, 0, 3))
            self.bytes_read += buf.numel()
        return tuple(out)

    def close(self):
        self._thread.shutdown(wait=True)
        if self.fd >= 0:
            os.close(self.fd)
            self.fd = -1


def _token_bytes(slab) -> int:
    batch, heads, dim, dtype = slab
    return batch * heads * dim * dtype.itemsize


def _pwrite(fd: int, data: torch.Tensor, offset: int) -> None:
    view = memoryview(data.view(torch.uint8).numpy())
    while view:
        done = os.pwrite(fd, view, offset)
        view, offset = view[done:], offset + done


def _pread(fd: int, buf: torch.Tensor, offset: int) -> None:
    view = memoryview(buf.numpy())
    while view:
        done = os.preadv(fd, [view], offset)
        if done == 0:
            raise OSError("the NVMe KV cache file ended early")
        view, offset = view[done:], offset + done


def kv_bytes(config, batch: int, tokens: int, dtype: torch.dtype) -> int:
    """Bytes of the keys and values of `batch` sequences of `tokens` tokens."""
    text = config.get_text_config(decoder=True)
    heads = getattr(text, "num_attention_heads")
    kv_heads = getattr(text, "num_key_value_heads", None) or heads
    head_dim = getattr(text, "head_dim", None) or text.hidden_size // heads
    return 2 * text.num_hidden_layers * batch * kv_heads * head_dim * tokens * dtype.itemsize
