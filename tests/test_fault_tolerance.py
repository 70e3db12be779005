"""A killed job restarts from its last checkpoint: under ``torchrun --max-restarts``, a rank killed
by SIGKILL after step k brings the group back, the script resumes from the checkpoint it finds
(weights, optimizer state, every rank's random states, the step), and the run ends with weights
bit-identical to an uninterrupted one (``tests/resume_job.py``, the README's recipe)."""

import os
import subprocess
import sys

import torch

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JOB = os.path.join(ROOT, "tests", "resume_job.py")


def _torchrun(ckpt: str, out: str, *extra: str) -> subprocess.Popen:
    env = dict(os.environ, PYTHONPATH=ROOT + os.pathsep + os.environ.get("PYTHONPATH", ""), FXPAR_TIMEOUT="30")
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc-per-node", "2",
           "--max-restarts", "1", "--monitor-interval", "0.5", JOB, "--ckpt", ckpt, "--out", out, *extra]
    return subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)


def _finish(proc: subprocess.Popen, what: str) -> str:
    try:
        log, _ = proc.communicate(timeout=300)
    except subprocess.TimeoutExpired:
        proc.kill()
        log, _ = proc.communicate()
    assert proc.returncode == 0, f"{what} exited with {proc.returncode}:\n{log[-6000:]}"
    return log


def test_a_killed_rank_restarts_from_the_checkpoint_bit_identical(tmp_path):
    # both jobs at once: the uninterrupted run, and one whose rank 1 is killed after step 3
    # (the checkpoint of step 2 committed, step 3 done and lost)
    plain = _torchrun(str(tmp_path / "plain"), str(tmp_path / "plain.pt"))
    killed = _torchrun(str(tmp_path / "killed"), str(tmp_path / "killed.pt"), "--kill-rank", "1", "--kill-after", "3")
    _finish(plain, "the uninterrupted job")
    log = _finish(killed, "the job whose rank was killed")
    assert "(exitcode: -9) local_rank: 1" in log  # torchrun saw the SIGKILL and restarted the group
    a = torch.load(tmp_path / "plain.pt", weights_only=True)
    b = torch.load(tmp_path / "killed.pt", weights_only=True)
    assert a["restarts"] == "0" and b["restarts"] == "1" and a["step"] == b["step"] == 6
    assert a["resumed_from"] is None and b["resumed_from"] == 2  # the restart loaded step 2's checkpoint
    assert a["state"].keys() == b["state"].keys()
    for name, t in a["state"].items():
        assert torch.equal(t, b["state"][name]), f"{name} differs after the restart"
    assert sorted(os.listdir(tmp_path / "killed")) == ["step_2", "step_4", "step_6"]
