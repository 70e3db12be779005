"""``fxpar.load`` from weight files: a Hugging Face folder (sharded safetensors with an index), a
single safetensors file, a ``torch.save`` state dict. Each rank of a model built on the meta
device reads only its slices; the result equals slicing the in-memory model, and the rank's peak
memory stays near its own shards."""

import gc
import os

import pytest
import torch
import torch.distributed as dist

import fxpar
from fxpar.shards import shard_tensor
from fxpar.models import gpt
from tests.zoo import hf_family

MESHES = [(2, dict(tp=2)), (2, dict(pp=2)), (4, dict(tp=2, pp=2))]


def _tp_rank(pm) -> int:
    return pm.mesh.coordinate(dist.get_rank())["tp"]


def _empty(name: str):
    """The family's model with its parameters on the meta device (buffers real: Llama's rotary
    table is computed, not loaded)."""
    model, ids, _ = hf_family(name)
    with fxpar.empty_weights():
        empty = type(model)(model.config)
    assert all(p.device.type == "meta" for p in empty.parameters())
    return empty, ids


def _load_and_compare(path: str, full: dict, mesh: dict, kind: str) -> int:
    """Parallelize a meta-device model, load ``path``, check every local tensor against the
    slice of ``full`` it should hold; returns how many tensors the rank holds."""
    if kind != "gpt":
        model, ids = _empty(kind)
    else:
        with torch.device("meta"):
            model = gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64))
        ids = torch.zeros(2, 16, dtype=torch.long)
    pm = fxpar.parallelize(model, fxpar.Mesh(**mesh), example_args=(ids,))
    result = fxpar.load(pm, path)
    assert result.missing_keys == [] and result.unexpected_keys == []
    tp = _tp_rank(pm)
    local = pm.state_dict()
    for name, t in local.items():
        expect = shard_tensor(full[name], pm.placement_of(name), tp)
        assert torch.equal(t, expect), f"{name} on rank {dist.get_rank()} differs from the slice of the model"
    return len(local)


CASES = [("gpt2", *m) for m in MESHES] + [("llama", 4, dict(tp=2, pp=2))]


@pytest.mark.parametrize("family, world, mesh", CASES, ids=lambda m: str(m))
def test_a_sharded_hugging_face_folder(pools, tmp_path, family, world, mesh):
    pytest.importorskip("transformers")
    model, _, _ = hf_family(family, seed=3)
    model.save_pretrained(tmp_path, max_shard_size="100KB")
    assert os.path.exists(tmp_path / "model.safetensors.index.json")
    full = {k: v.detach() for k, v in model.state_dict().items()}
    pools(world).run(_load_and_compare, str(tmp_path), full, mesh, family)


@pytest.mark.parametrize("fmt", ["safetensors", "torch"])
def test_a_single_file(pools, tmp_path, fmt):
    torch.manual_seed(4)
    model = gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64))
    full = {k: v.detach() for k, v in model.state_dict().items()}
    if fmt == "safetensors":
        from safetensors.torch import save_model

        path = str(tmp_path / "weights.safetensors")
        save_model(model, path)  # stores the tied embedding once
    else:
        path = str(tmp_path / "weights.pt")
        torch.save(model.state_dict(), path)
    pools(2).run(_load_and_compare, path, full, dict(tp=2), "gpt")


def _mismatch(path: str):
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=32))
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(torch.zeros(2, 16, dtype=torch.long),))
    try:
        fxpar.load(pm, path)
    except fxpar.FxparError as e:
        return str(e)
    return "loaded"


def test_weights_of_another_configuration_are_refused_naming_the_tensor(pools, tmp_path):
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=64, vocab_size=256, n_layer=2, n_head=4, n_embd=64))
    save_model(model, str(tmp_path / "model.safetensors"))
    for msg in pools(2).run(_mismatch, str(tmp_path)):
        assert "has shape" in msg and "in the model but" in msg and "transformer." in msg, msg


def test_names_that_differ_are_reported_and_can_be_renamed(tmp_path):
    """Checked without a process group: the name matching alone."""
    from fxpar.checkpoint.weights import _match

    names = {"transformer.h.0.w": (["transformer.h.0.w"], (2,), True), "lm_head.w": (["lm_head.w"], (2,), True)}
    # a checkpoint of the base model lacks the "transformer." prefix of the names under it
    assert _match(names, {"h.0.w", "lm_head.w"}, None) == {"transformer.h.0.w": "h.0.w", "lm_head.w": "lm_head.w"}
    assert _match(names, {"old.w"}, lambda k: "lm_head.w" if k == "old.w" else k) == {"lm_head.w": "old.w"}


# peak memory ----------------------------------------------------------------------------------
BIG = dict(block_size=64, vocab_size=8192, n_layer=8, n_head=12, n_embd=768)  # 240 MiB of fp32
BASELINE = 64 * 2**20


def _status() -> dict[str, int]:
    with open("/proc/self/status") as f:
        return {line.split(":")[0]: int(line.split()[1]) * 1024 for line in f if line.startswith(("VmHWM", "VmRSS"))}


def _peak_while_loading(path: str, mesh: dict):
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(**BIG))
    ids = torch.zeros(2, 16, dtype=torch.long)
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset the peak (VmHWM) to what is resident now
    base = _status()["VmRSS"]
    pm = fxpar.parallelize(model, fxpar.Mesh(**mesh), example_args=(ids,))
    fxpar.load(pm, path)
    peak = _status()["VmHWM"] - base
    own = sum({t.untyped_storage().data_ptr(): t.untyped_storage().nbytes() for t in pm.state_dict().values()}.values())
    return own, peak


@pytest.mark.skipif(not os.access("/proc/self/clear_refs", os.W_OK), reason="needs Linux /proc/self/clear_refs")
def test_peak_memory_of_a_loading_rank_stays_near_its_own_shards(pools, tmp_path, capsys):
    """Whole-model reads would show: the file is 240 MiB, a rank's shards 60-160 MiB, and the bound
    (1.5 x own shards + 64 MiB) is below own shards + the whole model on every mesh."""
    from safetensors.torch import save_model

    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(**BIG))
    save_model(model, str(tmp_path / "model.safetensors"))
    whole = os.path.getsize(tmp_path / "model.safetensors")
    del model
    rows = []
    for world, mesh in MESHES:
        for rank, (own, peak) in enumerate(pools(world).run(_peak_while_loading, str(tmp_path), mesh)):
            bound = 1.5 * own + BASELINE
            assert bound < own + whole, "the model is too small for the bound to tell a whole-model read"
            assert peak <= bound, f"{mesh} rank {rank}: peak {peak / 2**20:.0f} MiB > {bound / 2**20:.0f} MiB"
            rows.append((str(mesh), rank, own / 2**20, peak / 2**20, peak / own))
    with capsys.disabled():
        print(f"\n  loading a {whole / 2**20:.0f} MiB model: peak resident memory above the process's baseline")
        print("  mesh                  rank  own shards MiB  peak MiB  peak/own")
        for mesh, rank, own, peak, ratio in rows:
            print(f"  {mesh:20s}  {rank:4d}  {own:14.0f}  {peak:8.0f}  {ratio:8.2f}")
