"""What users read: the plan table, the dump of every rank's code, and the command line."""

import os

import torch

import fxpar
from fxpar.pipeline import PIPELINE
from fxpar.cli import main
from tests.zoo import build


def test_dump_writes_every_rank_annotated(tmp_path):
    model, args = build("gpt")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    files = plan.dump(str(tmp_path))
    assert sorted(os.path.basename(f) for f in files) == ["plan.txt", "rank0.py", "rank1.py", "summary.txt"]
    code = (tmp_path / "rank1.py").read_text()
    assert 'fxpar.all_reduce(linear_1, group="tp")' in code
    assert "sends 8.0 KiB fwd" in code
    assert "# S(2) (2, 16, 2, 16)" in code  # local shape of the heads of rank 1
    assert "# gpt.py:70  k = k.view(B, T, self.n_head, C // self.n_head)" in code  # relative to the model's package
    assert "aten.view(getitem_1, size=[2, 16, 2, 16])" in code  # the literal 4 heads became 2
    assert "column-parallel c_attn (3 segments), row-parallel c_proj" in code  # the module's header
    assert "= None" not in code and "getattr(" not in code and "fxpar.dropout(" not in code  # p=0: no op
    assert max(len(line) for line in code.splitlines()) <= 120
    compile(code, "rank1.py", "exec")
    table = (tmp_path / "plan.txt").read_text()
    assert "S(0)[3 seg]" in table and "colwise" in table and "rowwise" in table
    summary = (tmp_path / "summary.txt").read_text()
    assert "all_reduce" in summary and "parameters:" in summary


def test_rank_code_is_plain_python():
    model, args = build("mlp")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    code = plan.rank_code(0)
    compile(code, "rank0", "exec")
    assert "def forward(self, x)" in code


def test_cli_plan_dump_check(tmp_path, capsys):
    assert main(["plan", "mlp", "--tp", "2", "--brief"]) == 0
    out = capsys.readouterr().out
    assert "decisions:" in out and "colwise" in out
    assert main(["dump", "gpt", "--tp", "2", "--out", str(tmp_path), "--set", "n_layer=1"]) == 0
    assert (tmp_path / "rank0.py").exists()
    assert main(["check", "llama", "--tp", "2", "--train"]) == 0
    assert "values and gradients of Transformer at tp=2 match the single-device model" in capsys.readouterr().out
    assert main(["plan", "gpt", "--tp", "2", "--override", "lm_head=replicate"]) == 0
    assert "replicate: user override" in capsys.readouterr().out


def test_cli_context_parallel(capsys):
    assert main(["plan", "llama", "--cp", "2", "--tp", "2", "--brief"]) == 0
    assert "cp all_to_all" in capsys.readouterr().out
    assert main(["check", "llama", "--cp", "2", "--tp", "2", "--train"]) == 0
    assert "outputs and gradients of Transformer on Mesh(dp=1, pp=1, cp=2, tp=2) match" in capsys.readouterr().out
    # a plan that cannot be made is one line saying why, and exit status 2
    assert main(["plan", "llama", "--cp", "3", "--brief"]) == 2
    assert capsys.readouterr().err.startswith("fxpar: context parallelism splits the sequence")


def test_cli_expert_parallel(capsys):
    assert main(["plan", "moe", "--ep", "2", "--tp", "1", "--brief"]) == 0
    assert "ep all_to_all" in capsys.readouterr().out
    assert main(["check", "moe", "--ep", "2", "--tp", "2", "--train"]) == 0
    out = capsys.readouterr().out
    assert "on Mesh(dp=1, pp=1, ep=2, tp=2) match" in out and "rows per expert" in out
    assert main(["plan", "moe", "--ep", "3", "--tp", "1", "--brief"]) == 2
    assert "do not split evenly over ep=3" in capsys.readouterr().err


def test_debug_levels(monkeypatch, capsys, tmp_path):
    monkeypatch.setenv("FXPAR_DEBUG", "4")
    monkeypatch.setenv("FXPAR_DEBUG_DIR", str(tmp_path))
    model, args = build("mlp")
    fxpar.compile(model, fxpar.Mesh(tp=2), args)
    err = capsys.readouterr().err
    n = len(PIPELINE)
    i = [p.__name__ for p in PIPELINE].index("plan_sharding") + 1
    assert f"pass {i}/{n} plan_sharding" in err and "nodes" in err and "rank 1 code" in err
    assert len(list(tmp_path.iterdir())) == n


def test_plan_repr_and_table():
    model, args = build("mlp")
    plan = fxpar.compile(model, fxpar.Mesh(tp=2), args)
    assert "Plan(MLP, Mesh(dp=1, pp=1, tp=2)" in repr(plan)
    assert "placement" in plan.table()
    torch.testing.assert_close(plan.simulate(*args), model(*args))


def test_dump_writes_each_distinct_program_once(tmp_path):
    """Data-parallel replicas run the same code: one file, headed by every rank it serves."""
    model, args = build("gpt")
    plan = fxpar.compile(model, fxpar.Mesh(dp=2, tp=2), (torch.cat([args[0]] * 2),))
    files = sorted(os.path.basename(f) for f in plan.dump(str(tmp_path)))
    assert files == ["plan.txt", "rank0.py", "rank1.py", "summary.txt"]
    head = (tmp_path / "rank1.py").read_text().splitlines()[:2]
    assert head[1] == "# the same program runs on 2 ranks: 1, 3"
