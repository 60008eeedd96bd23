"""The stream discipline of docs/engine.md, checked on a CPU: the engine runs its CUDA control
flow against a recording stand-in for the device (tests/lane_recorder.py), and every
recorded hand-off is checked against the rules; training must still equal torch bit for bit.
"""
from __future__ import annotations

import copy
import dataclasses

import pytest
import torch

import tierflow
import tierflow.core.planner as planner_module
import tierflow.runtime.engine as engine_module
import tierflow.runtime.residency as residency_module

from conftest import SMALL_UNITS, assert_state_bitwise, make_batches, make_tiny
from lane_recorder import RecordingDevice, recorded_updates

CASES = {  # name -> offload options
    "device": dict(placement="device"),
    # host_in_place=False: host homes stream through device buffers, as on a GPU
    "host-evicting": dict(device_memory="96KiB", host_memory="4MiB", host_in_place=False),
    "nvme": dict(placement="nvme"),
    "host-activations-offload": dict(device_memory="256KiB", host_memory="4MiB", activations="offload",
                                     host_in_place=False),
}


@pytest.fixture
def recording(monkeypatch):
    RecordingDevice.log = []
    made = []

    def make_device(device):
        made.append(RecordingDevice(device))
        return made[-1]

    monkeypatch.setattr(engine_module, "ComputeDevice", make_device)
    monkeypatch.setattr(residency_module, "apply_updates",
                        recorded_updates(residency_module.apply_updates, lambda: made[-1]))
    return made


def _train(module, opt, clip, batches):
    for ids in batches:
        module(input_ids=ids, labels=ids).loss.backward()
        clip(1.0)
        opt.step()
        opt.zero_grad()


@pytest.mark.filterwarnings("ignore:could not allocate.*pinned")  # (CUDA control flow, CPU memory)
@pytest.mark.parametrize("update_on", ["cpu", "device"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_every_hand_off_is_ordered(tmp_path, engines, recording, monkeypatch, case, update_on):
    model = make_tiny("llama")
    ref = copy.deepcopy(model)
    options = dict(SMALL_UNITS, **CASES[case])
    if update_on == "device":  # the planner places GPU-side updates for a CUDA device only
        plan_sites = planner_module.update_sites
        monkeypatch.setattr(planner_module, "update_sites", lambda units, plan, cfg, *rest: plan_sites(
            units, plan, dataclasses.replace(cfg, device=torch.device("cuda", 0)), *rest))
    engine = tierflow.offload(model, nvme=tmp_path / "spill", update_on=update_on, **options)
    engines.append(engine)
    # update_on="device": AdamW of every host- or NVMe-homed unit is planned on the "GPU"
    assert any(engine.plan.device_updates) == (update_on == "device" and case != "device")
    opt = tierflow.AdamW(engine, lr=1e-2)
    batches = make_batches(4)
    _train(engine, opt, opt.clip_grad_norm_, batches)
    ref_opt = torch.optim.AdamW(ref.parameters(), lr=1e-2, fused=True)
    _train(ref, ref_opt, lambda n: torch.nn.utils.clip_grad_norm_(ref.parameters(), n), batches)
    assert_state_bitwise(ref.state_dict(), engine.state_dict())

    log = list(RecordingDevice.log)
    ops = {op for *_, op, _ in log}
    homes = {detail for *_, op, detail in log if op == "update"}
    # the GPU-side AdamW (DeviceAdamW, its downloads on the drain lane) ran, and only when asked
    assert any(h.endswith("/device-adamw") for h in homes) == (update_on == "device" and case != "device"), homes
    # (all on the device: no hand-off at all, every update on the compute stream)
    assert ({"update"} if case == "device" else {"record", "wait", "update", "hand_over"}) <= ops, ops
    _check_no_work_outside_lanes(log)
    fetched = _check_fetched_buffers(log)
    assert case == "device" or fetched, "no fetched buffer was checked"
    _check_updates(log)
    _check_drains(log)


def _check_no_work_outside_lanes(log):
    """A worker thread outside a lane would queue on the default stream, ordered with nothing."""
    stray = [entry for entry in log if entry[2] == "worker-default" and entry[3] != "sync"]  # (a host wait)
    assert not stray, f"GPU work on a worker thread outside any lane: {stray[:5]}"


def _check_fetched_buffers(log):
    """A device buffer handed to compute was allocated on the copy lane, and the compute stream
    waited for an event the copy lane recorded after that allocation."""
    allocation = {}  # data_ptr -> (seq, lane) of its latest allocation (memory is reused)
    checked = 0
    for seq, thread, lane, op, detail in log:
        if op == "alloc":
            allocation[detail] = (seq, lane)
        if op != "hand_over" or detail[1] != "compute" or detail[0] not in allocation:
            continue
        allocated_at, allocated_on = allocation[detail[0]]
        if allocated_on == "compute":
            continue  # device-homed state: allocated and used on the compute stream
        assert allocated_on == "copy", f"buffer handed to compute was allocated on {allocated_on}"
        waits = [e for s, t, l, o, e in log
                 if o == "wait" and t == thread and l == "compute" and allocated_at < s < seq
                 and e.lane == "copy" and e.seq > allocated_at]
        assert waits, f"compute used a fetched buffer (op {seq}) without waiting for its copy"
        checked += 1
    return checked


def _check_updates(log):
    """Device-homed AdamW runs on the compute stream; any update on the copy lane first waited
    for an event from the compute stream (the gradients and the clip coefficient)."""
    for seq, thread, lane, op, home in log:
        if op != "update":
            continue
        if home == "device":
            assert lane in ("compute", "copy"), (seq, lane)
            if lane == "compute":
                continue
        assert lane == "copy", f"update of {home} state on lane {lane}"
        mine = [(s, o, d) for s, t, _l, o, d in log if t == thread and s < seq]
        last_update = max((s for s, o, _ in mine if o == "update"), default=-1)
        gate_waits = [s for s, o, d in mine if o == "wait" and d.lane == "compute" and s > last_update]
        assert gate_waits, f"update (op {seq}) on the copy lane without waiting for the compute stream"


def _check_drains(log):
    """A gradient (or activation) taken over by the drain lane: the drain lane waited for an
    event the compute stream recorded, after the drain lane's previous job."""
    for seq, thread, lane, op, detail in log:
        if op != "hand_over" or lane != "drain":
            continue
        mine = [(s, o, d) for s, t, _l, o, d in log if t == thread and s < seq]
        last_sync = max((s for s, o, _ in mine if o == "sync"), default=-1)
        waits = [s for s, o, d in mine if o == "wait" and d.lane == "compute" and s > last_sync]
        assert waits, f"the drain lane took a tensor (op {seq}) without waiting for the compute stream"
