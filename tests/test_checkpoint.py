"""Sharded checkpoints: saved on one mesh, resumed on others with bit-identical parameters and
optimizer state and the losses of an uninterrupted run; readable by torch.distributed.checkpoint
alone; refused with a clear error when truncated, damaged, unfinished or of another model."""

import json
import os
import shutil
import warnings

import pytest
import torch
import torch.distributed.checkpoint as dcp
from torch.distributed.checkpoint.state_dict import (
    StateDictOptions,
    get_model_state_dict,
    get_optimizer_state_dict,
    set_model_state_dict,
    set_optimizer_state_dict,
)

import fxpar
from fxpar.models import gpt
from tests.zoo import adamw, assert_close, loss_with_target

CFG = dict(block_size=64, vocab_size=128, n_layer=2, n_head=4, n_embd=64)
STEPS, LR = 3, 1e-3
FLAT = StateDictOptions(flatten_optimizer_state_dict=True)


def _batch():
    g = torch.Generator().manual_seed(5)
    idx = torch.randint(0, CFG["vocab_size"], (4, 16), generator=g)
    return idx, torch.randint(0, CFG["vocab_size"], (4, 16), generator=g)


def _model(meta: bool):
    torch.manual_seed(0)
    if meta:
        with torch.device("meta"):
            return gpt.GPT(gpt.GPTConfig(**CFG))
    return gpt.GPT(gpt.GPTConfig(**CFG))


def _parallel(mesh: dict, meta: bool):
    idx, target = _batch()
    mesh = dict(mesh)
    zero = mesh.pop("zero", 0)
    m = fxpar.Mesh(**mesh)
    pm = fxpar.parallelize(_model(meta), m, example_args=(idx,), loss_fn=loss_with_target, example_target=target,
                           microbatches=2 if m.pp > 1 else 1, zero=zero)
    return pm, adamw(pm.parameters(), lr=LR)


def _steps(pm, opt, n: int) -> list[float]:
    idx, target = _batch()
    losses = []
    for _ in range(n):
        losses.append(pm.train_step(idx, target=target).item())
        opt.step()
        opt.zero_grad()
    return losses


def _first_run(path: str, mesh: dict | None = None) -> list[float]:
    """tp=2 x pp=2 (or ``mesh``): 3 steps, save, 3 more (the uninterrupted run)."""
    pm, opt = _parallel(mesh or dict(tp=2, pp=2), meta=False)
    _steps(pm, opt, STEPS)
    fxpar.save(pm, path, optimizer=opt)
    return _steps(pm, opt, STEPS)


def _resume(path: str, again: str, mesh: dict) -> list[float]:
    """Another mesh, a model on the meta device: load, save again untouched, 3 steps."""
    pm, opt = _parallel(mesh, meta=True)
    fxpar.load(pm, path, optimizer=opt)
    fxpar.save(pm, again, optimizer=opt)
    return _steps(pm, opt, STEPS)


def _read_whole(path: str):
    """The checkpoint as a single-device model and optimizer would load it with DCP alone."""
    model = _model(meta=False)
    opt = adamw(model.parameters(), lr=LR)
    state = {"model": get_model_state_dict(model), "optim": get_optimizer_state_dict(model, opt, options=FLAT)}
    with warnings.catch_warnings():
        warnings.simplefilter("ignore", UserWarning)  # "assuming the intent is to load in a single process"
        dcp.load(state, checkpoint_id=path, no_dist=True)
    set_model_state_dict(model, state["model"])
    set_optimizer_state_dict(model, opt, state["optim"], options=FLAT)
    return model.state_dict(), opt.state_dict()


def _assert_identical(a, b, what: str):
    (ma, oa), (mb, ob) = a, b
    assert set(ma) == set(mb)
    for k in ma:
        assert torch.equal(ma[k], mb[k]), f"{what}: parameter {k} differs"
    assert oa["param_groups"] == ob["param_groups"]
    for i, state in oa["state"].items():
        for k, v in state.items():
            assert torch.equal(v, ob["state"][i][k]), f"{what}: optimizer state {k} of parameter {i} differs"


@pytest.fixture(scope="module")
def saved(pools, tmp_path_factory):
    root = tmp_path_factory.mktemp("ckpt")
    path = str(root / "tp2pp2")
    losses = pools(4).run(_first_run, path)
    return root, path, losses[0]


@pytest.mark.parametrize("world, mesh", [(4, dict(tp=4)), (2, dict(tp=2)), (4, dict(dp=2, pp=2)), (4, dict(cp=2, tp=2)),
                                         (4, dict(dp=2, tp=2, zero=3)), (4, dict(dp=2, pp=2, zero=1))], ids=str)
def test_resume_on_another_mesh(pools, saved, world, mesh):
    root, path, uninterrupted = saved
    again = str(root / f"again-{'-'.join(f'{k}{v}' for k, v in mesh.items())}")
    losses = pools(world).run(_resume, path, again, mesh)[0]
    _assert_identical(_read_whole(path), _read_whole(again), f"saved at tp=2 x pp=2, reloaded at {mesh}")
    for step, (got, expect) in enumerate(zip(losses, uninterrupted)):
        assert_close(torch.tensor(got), torch.tensor(expect), f"loss of resumed step {step} at {mesh}", rtol=1e-5, atol=1e-6)


def test_a_checkpoint_saved_under_zero_resumes_without_it(pools, tmp_path):
    """Saved with the optimizer state split over dp (zero 2), resumed at tp=2 without zero, and the
    other way round: the same tensors, the losses of the uninterrupted run."""
    path, again = str(tmp_path / "zero2"), str(tmp_path / "again")
    uninterrupted = pools(4).run(_first_run, path, dict(dp=2, tp=2, zero=2))[0]
    losses = pools(2).run(_resume, path, again, dict(tp=2))[0]
    _assert_identical(_read_whole(path), _read_whole(again), "saved at dp=2 x tp=2 zero 2, reloaded at tp=2")
    for step, (got, expect) in enumerate(zip(losses, uninterrupted)):
        assert_close(torch.tensor(got), torch.tensor(expect), f"loss of resumed step {step}", rtol=1e-5, atol=1e-6)


def test_the_checkpoint_is_a_plain_dcp_checkpoint_under_the_original_names(saved):
    _, path, _ = saved
    md = dcp.FileSystemReader(path).read_metadata()
    keys = set(md.state_dict_metadata)
    assert {"model.transformer.wte.weight", "model.lm_head.weight"} <= keys  # tied: under both names
    assert "optim.state.transformer.h.0.attn.c_attn.weight.exp_avg" in keys
    assert "optim.param_groups.transformer.h.0.attn.c_attn.weight.lr" in keys
    # every stored tensor is whole once: the boxes cover it exactly
    for key, tmd in md.state_dict_metadata.items():
        if hasattr(tmd, "chunks"):
            assert sum(c.sizes.numel() for c in tmd.chunks) == tmd.size.numel(), key
    model, _ = _read_whole(path)
    assert model["lm_head.weight"].data_ptr() == model["transformer.wte.weight"].data_ptr()


def _load_error(path: str, mesh: dict, optimizer: bool = True, **cfg) -> str:
    idx, target = _batch()
    with torch.device("meta"):
        model = gpt.GPT(gpt.GPTConfig(**{**CFG, **cfg}))
    pm = fxpar.parallelize(model, fxpar.Mesh(**mesh), example_args=(idx,), loss_fn=loss_with_target,
                           example_target=target, microbatches=2 if mesh.get("pp", 1) > 1 else 1)
    opt = adamw(pm.parameters()) if optimizer else None
    try:
        fxpar.load(pm, path, optimizer=opt)
    except fxpar.FxparError as e:
        return str(e)
    return "loaded"


def _copy(path: str, to) -> str:
    shutil.copytree(path, to)
    return str(to)


def _largest_data_file(path: str) -> str:
    files = [os.path.join(path, f) for f in os.listdir(path) if f.endswith(".distcp")]
    return max(files, key=os.path.getsize)


def test_a_truncated_checkpoint_is_refused_naming_the_parameter(pools, saved, tmp_path):
    _, path, _ = saved
    bad = _copy(path, tmp_path / "truncated")
    file = _largest_data_file(bad)
    with open(file, "r+b") as f:
        f.truncate(os.path.getsize(file) // 2)
    for msg in pools(2).run(_load_error, bad, dict(tp=2)):
        assert "is truncated" in msg and "stored at bytes" in msg and "'" in msg, msg


def _box(path: str, fqn: str) -> tuple[str, int, int]:
    """``(file, first byte, length)`` of the first stored box of ``fqn``, from the manifest."""
    with open(os.path.join(path, "fxpar.json")) as f:
        item = next(i for i in json.load(f)["storage"] if i["fqn"] == fqn)
    return os.path.join(path, item["file"]), item["at"], item["length"]


def test_a_damaged_checkpoint_is_refused_naming_the_parameter(pools, saved, tmp_path):
    _, path, _ = saved
    bad = _copy(path, tmp_path / "damaged")
    file, at, length = _box(bad, "model.transformer.h.0.mlp.c_fc.weight")  # a tensor every load reads
    with open(file, "r+b") as f:
        f.seek(at + length // 2)
        byte = f.read(1)
        f.seek(at + length // 2)
        f.write(bytes([byte[0] ^ 0xFF]))
    msgs = pools(2).run(_load_error, bad, dict(tp=2))
    assert any("is damaged" in m and "does not match the checksum" in m for m in msgs), msgs


def test_a_save_that_did_not_finish_is_not_a_checkpoint(pools, saved, tmp_path):
    _, path, _ = saved
    unfinished = str(tmp_path / "step_9")
    _copy(path, unfinished + ".partial")
    os.remove(os.path.join(unfinished + ".partial", "fxpar.json"))
    for msg in pools(2).run(_load_error, unfinished, dict(tp=2)):
        assert "did not finish" in msg, msg
    for msg in pools(2).run(_load_error, unfinished + ".partial", dict(tp=2)):
        assert "did not finish" in msg, msg


def test_a_checkpoint_of_another_configuration_names_the_parameter(pools, saved):
    _, path, _ = saved
    for msg in pools(2).run(_load_error, path, dict(tp=2), n_embd=32):
        assert "with shape" in msg and "but the model's is" in msg and "transformer." in msg, msg


def _save_twice(path: str) -> list[str]:
    pm, opt = _parallel(dict(tp=2), meta=False)
    fxpar.save(pm, path)
    first = sorted(os.listdir(path))
    _steps(pm, opt, 1)
    fxpar.save(pm, path)  # replaces the first, whole
    return first + ["|"] + sorted(os.listdir(path)) + ["|"] + sorted(os.listdir(os.path.dirname(path)))


def test_saving_again_replaces_the_checkpoint_and_leaves_nothing_else(pools, tmp_path):
    out = pools(2).run(_save_twice, str(tmp_path / "ck"))[0]
    first, second, folder = " ".join(out).split(" | ")
    assert first == second and "fxpar.json" in first
    assert folder == "ck"


def test_a_checkpoint_without_optimizer_state_says_so(pools, tmp_path):
    path = str(tmp_path / "weights_only")
    pools(2).run(_save_twice, path)
    for msg in pools(2).run(_load_error, path, dict(tp=2)):
        assert "without optimizer state" in msg, msg
    assert pools(2).run(_load_error, path, dict(tp=2), optimizer=False) == ["loaded", "loaded"]


def _shared_heads(path: str, mesh: dict, save: bool) -> dict:
    """The reference Llama (4 query, 2 key/value heads): at tp=4 each key/value head is held by
    2 ranks. Train, save (or load), return the whole weights and the next step's loss."""
    from fxpar.models import llama

    torch.manual_seed(0)
    model, (idx,) = llama.build()
    pm = fxpar.parallelize(model, fxpar.Mesh(**mesh), example_args=(idx,))
    opt = adamw(pm.parameters(), lr=LR)
    target = torch.randint(0, 256, idx.shape, generator=torch.Generator().manual_seed(3))
    if save:
        for _ in range(2):
            loss_with_target(pm(idx), target).backward()
            opt.step()
            opt.zero_grad()
        fxpar.save(pm, path, optimizer=opt)
    else:
        fxpar.load(pm, path, optimizer=opt)
    whole = pm.full_state_dict()
    loss = loss_with_target(pm(idx), target)
    loss.backward()
    opt.step()
    return {"loss": loss.item(), "state": whole, "after": pm.full_state_dict()}


def test_key_value_heads_shared_by_ranks_save_once_and_reshard(pools, tmp_path):
    path = str(tmp_path / "shared")
    saved = pools(4).run(_shared_heads, path, dict(tp=4), True)[0]
    loaded = pools(2).run(_shared_heads, path, dict(tp=2), False)[0]
    for key, value in saved["state"].items():
        assert torch.equal(loaded["state"][key], value), f"{key} after loading at tp=2"
    assert loaded["loss"] == pytest.approx(saved["loss"], rel=1e-6)
    for key, value in saved["after"].items():  # the optimizer state came along: the same step
        assert_close(loaded["after"][key], value, f"{key} one step after loading", rtol=1e-5, atol=1e-6)
