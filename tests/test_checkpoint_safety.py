"""What fxpar reads of a folder, and what a load or a save may change: nothing runs from a folder
unless the user marks it trusted; a load is all or nothing and reports what did not match; a save
never replaces what is not a checkpoint; the collectives of both time out with fxpar's timeout."""

import datetime
import json
import multiprocessing
import os
import pickle
import time
import zlib

import torch
import torch.distributed as dist
import torch.distributed.checkpoint as dcp
from safetensors.torch import save_file

import fxpar
from fxpar.models import gpt
from tests.distributed import _free_port
from tests.zoo import adamw, error_of, loss_with_target

CFG = dict(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32)


class _Payload:
    """Unpickling this creates a file: proof that code ran."""

    def __init__(self, marker: str):
        self.marker = marker

    def __reduce__(self):
        return (open, (self.marker, "w"))


def _parallel(n_layer: int = 2, meta: bool = False):
    torch.manual_seed(0)
    cfg = gpt.GPTConfig(**{**CFG, "n_layer": n_layer})
    if meta:
        with torch.device("meta"):
            model = gpt.GPT(cfg)
    else:
        model = gpt.GPT(cfg)
    idx = torch.randint(0, CFG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx,), loss_fn=loss_with_target, example_target=idx)
    return pm, adamw(pm.parameters(), lr=1e-2), idx


def _step(pm, opt, idx):
    pm.train_step(idx, target=idx)
    opt.step()
    opt.zero_grad()


def _snapshot(pm, opt) -> tuple:
    def copy(v):
        return v.clone() if isinstance(v, torch.Tensor) else v

    return ({k: v.clone() for k, v in pm.state_dict().items()},
            {id(p): {k: copy(v) for k, v in s.items()} for p, s in opt.state.items()},
            [{k: v for k, v in g.items() if k != "params"} for g in opt.param_groups])


def _unchanged(before, after) -> bool:
    (ma, sa, ga), (mb, sb, gb) = before, after
    same_model = all(torch.equal(ma[k], mb[k]) for k in ma)
    same_state = sa.keys() == sb.keys() and all(
        torch.equal(v, sb[p][k]) if isinstance(v, torch.Tensor) else v == sb[p][k]
        for p, s in sa.items() for k, v in s.items())
    return same_model and same_state and ga == gb


# what is read ------------------------------------------------------------------------------------
def _hugging_face_folder_with_a_pickle(folder: str, marker: str) -> str:
    pm, _, _ = _parallel()
    full = pm.full_state_dict()  # a collective
    if dist.get_rank() == 0:
        os.makedirs(folder, exist_ok=True)
        with open(os.path.join(folder, "config.json"), "w") as f:
            json.dump({"model_type": "gpt2"}, f)
        tensors = {k: v.contiguous() for k, v in full.items() if k != "lm_head.weight"}  # tied: stored once
        save_file(tensors, os.path.join(folder, "model.safetensors"))
        with open(os.path.join(folder, ".metadata"), "wb") as f:
            pickle.dump(_Payload(marker), f)
    dist.barrier()
    return error_of(lambda: fxpar.load(pm, folder))


def test_a_downloaded_folder_with_a_crafted_metadata_runs_nothing(pools, tmp_path):
    marker = str(tmp_path / "code_ran")
    for msg in pools(2).run(_hugging_face_folder_with_a_pickle, str(tmp_path / "download"), marker):
        assert msg.startswith("CheckpointError: fxpar will not load"), msg
        assert "no fxpar.json" in msg and "a pickle" in msg and "trusted=True" in msg
    assert not os.path.exists(marker)


def _save(path: str, steps: int = 1, optimizer: bool = True) -> None:
    pm, opt, idx = _parallel()
    for _ in range(steps):
        _step(pm, opt, idx)
    fxpar.save(pm, path, optimizer=opt if optimizer else None, extra={"step": steps})


def _load(path: str, **kwargs):
    pm, opt, _ = _parallel(meta=True)
    try:
        result = fxpar.load(pm, path, optimizer=opt, **kwargs)
    except fxpar.FxparError as e:
        return f"{type(e).__name__}: {e}"
    return result.extra, sorted(pm.state_dict())[:1]


def test_a_checkpoint_is_read_through_its_manifest_never_its_pickle(pools, tmp_path):
    path = str(tmp_path / "ck")
    pools(2).run(_save, path)
    marker = str(tmp_path / "code_ran")
    with open(os.path.join(path, ".metadata"), "wb") as f:  # DCP's own description, replaced
        pickle.dump(_Payload(marker), f)
    for result in pools(2).run(_load, path):
        assert result[0] == {"step": 1}, result
    assert not os.path.exists(marker)


def test_a_crafted_value_in_a_checkpoint_is_refused_without_running(pools, tmp_path):
    path = str(tmp_path / "ck")
    pools(2).run(_save, path)
    marker = str(tmp_path / "code_ran")
    with open(os.path.join(path, "fxpar.json")) as f:
        doc = json.load(f)
    # an attacker who writes the folder writes its manifest too: a value pointing at a pickle,
    # with a checksum that matches
    item = next(i for i in doc["storage"] if i["fqn"].startswith("optim.param_groups.") and i["fqn"].endswith(".lr"))
    blob = pickle.dumps(_Payload(marker))
    data = os.path.join(path, item["file"])
    item["at"], item["length"] = os.path.getsize(data), len(blob)
    with open(data, "ab") as f:
        f.write(blob)
    doc["checksums"][item["file"]][str(item["at"])] = zlib.crc32(blob)
    with open(os.path.join(path, "fxpar.json"), "w") as f:
        json.dump(doc, f)
    for msg in pools(2).run(_load, path):
        assert isinstance(msg, str) and "is not plain data that fxpar reads without running code" in msg, msg
    assert not os.path.exists(marker)


def _foreign(path: str) -> None:
    """A checkpoint written by torch.distributed.checkpoint alone, from a single-device model."""
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(**CFG))
    dcp.save({f"model.{k}": v for k, v in model.state_dict().items()}, checkpoint_id=path, no_dist=True)


def _load_foreign(path: str, trusted: bool):
    pm, _, _ = _parallel(meta=True)
    try:
        fxpar.load(pm, path, trusted=trusted)
    except fxpar.FxparError as e:
        return f"{type(e).__name__}: {e}"
    return pm.full_state_dict()["lm_head.weight"]


def test_a_checkpoint_fxpar_did_not_write_needs_trusted(pools, tmp_path):
    path = str(tmp_path / "foreign")
    _foreign(path)
    for msg in pools(2).run(_load_foreign, path, False):
        assert "no fxpar.json" in msg and "fxpar.load(pm, path, trusted=True)" in msg, msg
    torch.manual_seed(0)
    expect = gpt.GPT(gpt.GPTConfig(**CFG)).state_dict()["lm_head.weight"]
    for got in pools(2).run(_load_foreign, path, True):
        assert torch.equal(got, expect)


def test_a_weights_index_cannot_point_outside_its_folder(tmp_path):
    from fxpar.checkpoint.weights import weight_files

    folder = tmp_path / "model"
    folder.mkdir()
    with open(folder / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"w": "../elsewhere.safetensors"}}, f)
    try:
        weight_files(str(folder))
    except fxpar.FxparError as e:
        assert "outside" in str(e)
    else:
        raise AssertionError("an index naming a file outside its folder was accepted")


# what a load changes -----------------------------------------------------------------------------
def _mismatched(path: str, n_layer: int, strict: bool):
    pm, _, _ = _parallel(n_layer=n_layer, meta=True)
    try:
        result = fxpar.load(pm, path, strict=strict)
    except fxpar.FxparError as e:
        return str(e)
    return result.missing_keys, result.unexpected_keys


def test_a_load_reports_what_is_missing_and_what_is_unexpected(pools, tmp_path):
    path = str(tmp_path / "two_layers")
    pools(2).run(_save, path, 1, False)
    missing, unexpected = pools(2).run(_mismatched, path, 1, False)[0]
    assert missing == [] and unexpected and all(k.startswith("transformer.h.1.") for k in unexpected), unexpected
    missing, unexpected = pools(2).run(_mismatched, path, 3, False)[0]
    assert unexpected == [] and missing and all(k.startswith("transformer.h.2.") for k in missing), missing
    for n_layer, word in ((1, "tensors the model lacks"), (3, "tensors of the model")):
        msg = pools(2).run(_mismatched, path, n_layer, True)[0]
        assert isinstance(msg, str) and word in msg and "strict=False" in msg, msg


def _resume_before_first_step(path: str):
    pm, opt, idx = _parallel()
    fxpar.save(pm, path, optimizer=opt)  # no step yet: the optimizer has no state
    pm2, opt2, _ = _parallel(meta=True)
    fxpar.load(pm2, path, optimizer=opt2)
    empty = not opt2.state
    lr = opt2.param_groups[0]["lr"]
    _step(pm, opt, idx)
    _step(pm2, opt2, idx)
    same = all(torch.equal(a, b) for a, b in zip(pm.state_dict().values(), pm2.state_dict().values()))
    return empty, lr, same


def test_a_checkpoint_saved_before_the_first_step_resumes(pools, tmp_path):
    for empty, lr, same in pools(2).run(_resume_before_first_step, str(tmp_path / "step_0")):
        assert empty and lr == 1e-2 and same


def _failed_load_changes_nothing(path: str):
    pm, opt, idx = _parallel()
    _step(pm, opt, idx)
    _step(pm, opt, idx)
    before = _snapshot(pm, opt)
    msg = error_of(lambda: fxpar.load(pm, path, optimizer=opt))
    return msg, _unchanged(before, _snapshot(pm, opt))


def test_a_failed_load_leaves_the_model_and_the_optimizer_as_they_were(pools, tmp_path):
    path = str(tmp_path / "ck")
    pools(2).run(_save, path)
    with open(os.path.join(path, "fxpar.json")) as f:
        doc = json.load(f)
    last = doc["storage"][-1]  # damage the last box read: everything before it loaded already
    with open(os.path.join(path, last["file"]), "r+b") as f:
        f.seek(last["at"] + last["length"] - 1)
        byte = f.read(1)
        f.seek(last["at"] + last["length"] - 1)
        f.write(bytes([byte[0] ^ 0xFF]))
    for msg, unchanged in pools(2).run(_failed_load_changes_nothing, path):
        assert "is damaged" in msg, msg
        assert unchanged


# what a save changes -----------------------------------------------------------------------------
def _save_over(path: str) -> str:
    pm, opt, _ = _parallel()
    return error_of(lambda: fxpar.save(pm, path, optimizer=opt))


def test_a_save_refuses_a_path_that_is_not_a_checkpoint_before_touching_it(pools, tmp_path):
    file = tmp_path / "notes.txt"
    file.write_text("mine")
    for msg in pools(2).run(_save_over, str(file)):
        assert "exists and is not a folder" in msg, msg
    assert file.read_text() == "mine" and sorted(os.listdir(tmp_path)) == ["notes.txt"]
    folder = tmp_path / "data"
    folder.mkdir()
    (folder / "train.bin").write_text("data")
    for msg in pools(2).run(_save_over, str(folder)):
        assert "is a folder that is not an fxpar checkpoint" in msg, msg
    assert os.listdir(folder) == ["train.bin"]
    ok = tmp_path / "ck"
    assert pools(2).run(_save_over, str(ok)) == ["no error"] * 2
    assert pools(2).run(_save_over, str(ok)) == ["no error"] * 2  # an earlier checkpoint is replaced


# collectives -------------------------------------------------------------------------------------
def _stuck_peer(rank: int, port: int, what: str, path: str, out) -> None:
    os.environ.update(MASTER_ADDR="127.0.0.1", MASTER_PORT=str(port))
    dist.init_process_group("gloo", rank=rank, world_size=2)  # torch's default: a 30-minute timeout
    torch.set_num_threads(1)
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(**CFG))
    idx = torch.zeros(2, 8, dtype=torch.long)
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx,), timeout=datetime.timedelta(seconds=3))
    fxpar.save(pm, path)
    if rank == 1:
        time.sleep(30)  # stuck: alive, but never calls the next save or load
        return
    t0 = time.monotonic()
    try:
        fxpar.save(pm, path) if what == "save" else fxpar.load(pm, path)
        out.put("no error")
    except fxpar.CollectiveError as e:
        out.put(f"{time.monotonic() - t0:.1f}s {e}")
    except Exception as e:  # noqa: BLE001 - the test reports it
        out.put(f"0s {type(e).__name__}: {e}")
    out.close()
    out.join_thread()  # the answer is sent before the process goes
    os._exit(0)


def test_save_and_load_time_out_with_fxpars_timeout_on_a_stuck_peer(tmp_path):
    ctx = multiprocessing.get_context("spawn")
    for what in ("save", "load"):
        out = ctx.Queue()
        port = _free_port()
        path = str(tmp_path / what)
        procs = [ctx.Process(target=_stuck_peer, args=(r, port, what, path, out), daemon=True) for r in range(2)]
        for p in procs:
            p.start()
        msg = out.get(timeout=120)
        for p in procs:
            p.kill()
        seconds = float(msg.split("s ", 1)[0])
        assert seconds < 20, msg
        assert f"{'saving' if what == 'save' else 'loading'} checkpoint" in msg, msg
        assert "timeout 3s" in msg, msg


def _named_optimizer(path: str, mesh: dict, save: bool):
    torch.manual_seed(0)
    m = fxpar.Mesh(**mesh)
    idx = torch.randint(0, CFG["vocab_size"], (2, 8), generator=torch.Generator().manual_seed(1))
    pm = fxpar.parallelize(gpt.GPT(gpt.GPTConfig(**CFG)), m, example_args=(idx,), loss_fn=loss_with_target,
                           example_target=idx, microbatches=2 if m.pp > 1 else 1)
    opt = torch.optim.AdamW(pm.named_parameters(), lr=1e-2)  # its groups list the parameters' names
    if save:
        _step(pm, opt, idx)
        fxpar.save(pm, path, optimizer=opt)
        return None
    names = list(opt.param_groups[0]["param_names"])
    fxpar.load(pm, path, optimizer=opt)
    return opt.param_groups[0]["param_names"] == names and len(opt.state) == len(names)


def test_an_optimizer_made_from_named_parameters_reshards(pools, tmp_path):
    path = str(tmp_path / "named")
    pools(2).run(_named_optimizer, path, dict(pp=2), True)
    assert pools(2).run(_named_optimizer, path, dict(tp=2), False) == [True, True]


def _optimizer_with_a_grown_model(path: str):
    pm, opt, idx = _parallel(n_layer=3)
    _step(pm, opt, idx)
    grown = {k: v.clone() for k, v in opt.state[dict(pm.named_parameters())["transformer.h.2.mlp.c_fc.weight"]].items()}
    result = fxpar.load(pm, path, optimizer=opt, strict=False)
    kept = opt.state[dict(pm.named_parameters())["transformer.h.2.mlp.c_fc.weight"]]
    return result.missing_keys, all(torch.equal(grown[k], kept[k]) for k in grown)


def test_strict_false_loads_the_optimizer_state_of_what_matches(pools, tmp_path):
    path = str(tmp_path / "two_layers")
    pools(2).run(_save, path)
    missing, kept = pools(2).run(_optimizer_with_a_grown_model, path)[0]
    assert missing and all(k.startswith("transformer.h.2.") for k in missing) and kept


def test_a_hugging_face_cache_folder_of_links_is_read(tmp_path):
    from fxpar.checkpoint.weights import weight_files

    blobs, snapshot = tmp_path / "blobs", tmp_path / "snapshots" / "abc"
    blobs.mkdir()
    snapshot.mkdir(parents=True)
    save_file({"w": torch.zeros(2)}, str(blobs / "1234"))
    os.symlink(blobs / "1234", snapshot / "model-00001-of-00001.safetensors")
    with open(snapshot / "model.safetensors.index.json", "w") as f:
        json.dump({"weight_map": {"w": "model-00001-of-00001.safetensors"}}, f)
    assert weight_files(str(snapshot)) == {"w": str(snapshot / "model-00001-of-00001.safetensors")}


def test_a_commit_cut_between_its_renames_is_finished_by_the_next_save(tmp_path):
    from fxpar.checkpoint import manifest

    path = str(tmp_path / "ck")
    for folder, step in ((path + ".old", 1), (path + ".partial", 2)):  # the old one moved, the new one whole
        os.makedirs(folder)
        manifest.write(folder, {"extra": {"step": step}})
    manifest.recover(path)
    assert manifest.read(path)["extra"] == {"step": 2} and manifest.latest(str(tmp_path)) == path
