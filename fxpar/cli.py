"""``python -m fxpar``: plan, dump, check and demo from the command line.

    python -m fxpar demo --tp 2                 # train a GPT over 2 local CPU processes
    python -m fxpar plan gpt --tp 4             # every value's placement, every collective
    python -m fxpar plan llama --pp 4 --microbatches 8 --brief   # stages, their memory, the schedule
    python -m fxpar plan llama --cp 2 --tp 2 --brief             # the sequence split over 2 ranks, heads over 2
    python -m fxpar check moe --ep 2 --tp 2 --train              # experts over 2 ranks, each split over 2
    python -m fxpar dump llama --tp 2 --out d   # rank0.py, rank1.py, plan.txt, summary.txt
    python -m fxpar check gpt --tp 2 --train    # simulate all ranks, compare with one device
    python -m fxpar plan llama --tp 2 --sp      # with sequence parallelism
    python -m fxpar plan llama --tp 2 --device h100-80gb --brief  # and its step time on H100s
    python -m fxpar plan llama --auto --world 8 --device h100-80gb --batch 64   # which mesh to use
    python -m fxpar generate llama --tp 2 --prompt-len 64 --new 32   # tokens/s, latency per token

A model is a module of ``models/`` (``gpt``, ``llama``, ``mlp``, ``moe``) or ``package.module:function``
returning ``(model, example_args)``; ``--set n_layer=4`` passes config overrides to it.
"""

from __future__ import annotations

import argparse
import importlib
import sys

from .options import SCHEDULES


def load_model(spec: str, settings: list[str]):
    """``(model, example_args)`` from a ``models/`` name or ``module:function``."""
    kwargs = {}
    for item in settings or []:
        key, _, value = item.partition("=")
        kwargs[key] = _parse(value)
    if ":" in spec:
        mod_name, fn_name = spec.split(":", 1)
    else:
        mod_name, fn_name = f"fxpar.models.{spec}", "build"
    try:
        fn = getattr(importlib.import_module(mod_name), fn_name)
    except (ImportError, AttributeError) as e:
        raise SystemExit(f"fxpar: cannot load model {spec!r}: {e}. Use a name in models/ (gpt, llama, mlp, moe) or module:function")
    model, args = fn(**kwargs)
    return model, args if isinstance(args, tuple) else (args,)


def _parse(value: str):
    for conv in (int, float):
        try:
            return conv(value)
        except ValueError:
            pass
    return {"true": True, "false": False, "none": None}.get(value.lower(), value)


def _compile(a):
    import torch

    import fxpar

    torch.manual_seed(a.seed)
    model, args = load_model(a.model, a.set)
    overrides = dict(o.split("=", 1) for o in a.override or [])
    copies = a.dp * a.ep * a.microbatches  # the example batch, repeated for every replica and microbatch
    args = tuple(torch.cat([x] * copies) if isinstance(x, torch.Tensor) else x for x in args)
    mesh = fxpar.Mesh(dp=a.dp, pp=a.pp, ep=a.ep, cp=a.cp, tp=a.tp)
    plan = fxpar.compile(model, mesh, args, overrides=overrides, schedule=a.schedule, microbatches=a.microbatches,
                         virtual=a.virtual, sequence_parallel=a.sp, recompute_gathers=a.recompute_gathers)
    return plan, args


def cmd_plan(a) -> int:
    if a.auto:
        return _autoplan(a)
    plan, _ = _compile(a)
    print(plan.summary())
    if a.device:
        print(f"estimate: {plan.estimate(a.device, a.gpus_per_node)}")
    if not a.brief:
        print()
        print(plan.table())
    return 0


def _autoplan(a) -> int:
    """``plan --auto``: the planner's candidates for ``--world`` devices (the model builder's
    example, one sample of it, stands for every sample of ``--batch``)."""
    import torch

    import fxpar

    torch.manual_seed(a.seed)
    model, args = load_model(a.model, a.set)
    one = tuple(x[:1] if isinstance(x, torch.Tensor) and x.dim() else x for x in args)
    world = a.world or a.dp * a.pp * a.tp
    found = fxpar.autoplan(model, world_size=world, device=a.device or "h100-80gb", global_batch=a.batch,
                           example_args=one, gpus_per_node=a.gpus_per_node, verbose=True)
    if not found:
        print("fxpar: no candidate fits; see the reasons above", file=sys.stderr)
        return 2
    return 0


def cmd_dump(a) -> int:
    plan, _ = _compile(a)
    for path in plan.dump(a.out):
        print(path)
    return 0


def cmd_check(a) -> int:
    import fxpar

    plan, args = _compile(a)
    loss_fn = _square_loss if a.train else None
    if plan.mesh.cp > 1 or plan.mesh.ep > 1:
        return _check_whole(plan, args, a)
    try:
        n = plan.check(*args, rtol=a.rtol, atol=a.atol, loss_fn=loss_fn)
    except fxpar.DivergenceError as e:
        print(e)
        return 1
    what = "values and gradients" if a.train else "values"
    print(f"{n} {what} of {type(plan.model).__name__} at tp={a.tp} match the single-device model")
    return 0


def _check_whole(plan, args, a) -> int:
    """Compare what the model returns (and, with ``--train``, every gradient) with the single-device
    model: a cp plan's graph is one cp rank's program (an ep plan's one replica's, with its
    experts), so nodes cannot be compared one by one. An ep plan also prints its expert report."""
    import copy

    import torch
    from torch.utils import _pytree as pytree

    ref = copy.deepcopy(plan.model)
    pairs = list(zip(pytree.tree_leaves(plan.simulate(*args)), pytree.tree_leaves(ref(*args))))
    what = "outputs"
    if a.train:
        _, grads = plan.simulate_train(_square_loss, *args)
        _square_loss(ref(*args)).backward()
        pairs += [(grads[n], p.grad) for n, p in ref.named_parameters() if p.grad is not None]
        what = "outputs and gradients"
    bad = [i for i, (x, y) in enumerate(pairs) if isinstance(x, torch.Tensor) and x.is_floating_point()
           and not torch.allclose(x, y, rtol=a.rtol, atol=a.atol)]
    if bad:
        print(f"{len(bad)} of {len(pairs)} {what} of {type(plan.model).__name__} differ from the single-device model")
        return 1
    print(f"{len(pairs)} {what} of {type(plan.model).__name__} on {plan.mesh} match the single-device model")
    if plan.ctx.expert_layers:
        print(plan.expert_report())
    return 0


def _square_loss(out):
    """A loss of any output structure: the mean square of its floating-point tensors."""
    import torch
    from torch.utils import _pytree as pytree

    leaves = [t for t in pytree.tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    return sum(t.float().pow(2).mean() for t in leaves)


def cmd_demo(a) -> int:
    from .demo import main as demo

    return demo(tp=a.tp, steps=a.steps, out=a.out)


def cmd_generate(a) -> int:
    from .generate_demo import main as generate

    return generate(a.model, tp=a.tp, pp=a.pp, prompt_len=a.prompt_len, new=a.new, batch=a.batch, settings=a.set,
                    seed=a.seed)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(prog="python -m fxpar", description=__doc__.split("\n\n")[0])
    sub = p.add_subparsers(dest="cmd", required=True)

    def model_args(sp):
        sp.add_argument("model", help="models/ name (gpt, llama, mlp, moe) or module:function")
        sp.add_argument("--tp", type=int, default=2)
        sp.add_argument("--pp", type=int, default=1)
        sp.add_argument("--dp", type=int, default=1)
        sp.add_argument("--cp", type=int, default=1,
                        help="context parallelism: split the sequence over this many ranks")
        sp.add_argument("--ep", type=int, default=1,
                        help="expert parallelism: split every mixture-of-experts layer's experts over this many ranks")
        sp.add_argument("--schedule", default="1f1b", choices=list(SCHEDULES))
        sp.add_argument("--microbatches", type=int, default=1)
        sp.add_argument("--virtual", type=int, default=None, help="stages per rank with --schedule interleaved (default 2)")
        sp.add_argument("--sp", action="store_true", help="sequence parallelism: split the activations between TP blocks by sequence")
        sp.add_argument("--recompute-gathers", action="store_true", help="keep shards of gathered inputs, gather again in backward")
        sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for the model builder")
        sp.add_argument("--override", action="append", metavar="NAME=STYLE", help="force colwise/rowwise/replicate/vocab")
        sp.add_argument("--seed", type=int, default=0)

    sp = sub.add_parser("plan", help="print the plan: placements, decisions, collectives")
    model_args(sp)
    sp.add_argument("--brief", action="store_true", help="summary only")
    sp.add_argument("--auto", action="store_true", help="search the mesh and options (fxpar.autoplan) instead")
    sp.add_argument("--world", type=int, default=None, help="devices to plan for with --auto")
    sp.add_argument("--device", default=None, help="device profile for the step-time estimate (h100-80gb, cpu, ...)")
    sp.add_argument("--batch", type=int, default=8, help="global batch (samples) with --auto")
    sp.add_argument("--gpus-per-node", type=int, default=8)
    sp.set_defaults(fn=cmd_plan)
    sp = sub.add_parser("dump", help="write every rank's code and the plan table to a folder")
    model_args(sp)
    sp.add_argument("--out", default="fxpar_out")
    sp.set_defaults(fn=cmd_dump)
    sp = sub.add_parser("check", help="simulate all ranks and compare with the single-device model")
    model_args(sp)
    sp.add_argument("--rtol", type=float, default=1e-5)
    sp.add_argument("--atol", type=float, default=1e-5)
    sp.add_argument("--train", action="store_true", help="also compare every gradient (mean-square loss of the outputs)")
    sp.set_defaults(fn=cmd_check)
    sp = sub.add_parser("demo", help="train a GPT over local CPU processes and compare with one process")
    sp.add_argument("--tp", type=int, default=2)
    sp.add_argument("--steps", type=int, default=5)
    sp.add_argument("--out", default="fxpar_out")
    sp.set_defaults(fn=cmd_demo)
    sp = sub.add_parser("generate", help="generate with the key/value cache over local CPU processes, against one")
    sp.add_argument("model", help="models/ name (gpt, llama, moe) or module:function")
    sp.add_argument("--tp", type=int, default=2)
    sp.add_argument("--pp", type=int, default=1)
    sp.add_argument("--prompt-len", type=int, default=64)
    sp.add_argument("--new", type=int, default=32, help="tokens to generate")
    sp.add_argument("--batch", type=int, default=1, help="prompts generated together")
    sp.add_argument("--set", action="append", metavar="KEY=VALUE", help="config override for the model builder")
    sp.add_argument("--seed", type=int, default=0)
    sp.set_defaults(fn=cmd_generate)
    a = p.parse_args(argv)
    from .errors import FxparError

    try:
        return a.fn(a)
    except FxparError as e:  # a plan that cannot be made says why, without a traceback
        print(f"fxpar: {e}", file=sys.stderr)
        return 2


if __name__ == "__main__":
    sys.exit(main())
