"""A training job that resumes from its last checkpoint, as the README's recipe writes it.

Run under ``torchrun --max-restarts N``: at start it loads the newest checkpoint in ``--ckpt``
(weights, optimizer state, every rank's random states and the step it had reached), trains to
``--steps`` saving every ``--every`` steps, and rank 0 writes the final full state dict to
``--out``. ``--kill-rank R --kill-after K`` makes rank R kill its own process (SIGKILL: no
exception, no clean-up) after step K of the first attempt, which torchrun answers by restarting
every rank.
"""

import argparse
import os
import signal

import torch
import torch.distributed as dist
import torch.nn.functional as F

import fxpar
from fxpar.models import gpt


def loss_fn(logits, target):
    return F.cross_entropy(logits.flatten(0, 1), target.flatten())


def batch():
    # drawn from torch's default generator, which the checkpoint restores on every rank
    return torch.randint(0, 64, (4, 16)), torch.randint(0, 64, (4, 16))


def main() -> None:
    p = argparse.ArgumentParser()
    p.add_argument("--ckpt", required=True)
    p.add_argument("--out", required=True)
    p.add_argument("--steps", type=int, default=6)
    p.add_argument("--every", type=int, default=2)
    p.add_argument("--kill-rank", type=int, default=-1)
    p.add_argument("--kill-after", type=int, default=-1)
    args = p.parse_args()
    torch.manual_seed(0)
    model = gpt.GPT(gpt.GPTConfig(block_size=32, vocab_size=64, n_layer=2, n_head=2, n_embd=32, dropout=0.1))
    idx, target = batch()
    # the process group comes from torchrun's environment (fxpar.Mesh.bind), one per attempt
    pm = fxpar.parallelize(model, fxpar.Mesh(tp=2), example_args=(idx,), loss_fn=loss_fn, example_target=target)
    opt = torch.optim.AdamW(pm.parameters(), lr=1e-2)
    step, resumed_from = 0, None
    last = fxpar.latest_checkpoint(args.ckpt)
    if last is not None:
        step = resumed_from = fxpar.load(pm, last, optimizer=opt).extra["step"]
    first_attempt = os.environ.get("TORCHELASTIC_RESTART_COUNT", "0") == "0"
    while step < args.steps:
        idx, target = batch()
        pm.train_step(idx, target=target)
        opt.step()
        opt.zero_grad()
        step += 1
        if step % args.every == 0:
            fxpar.save(pm, os.path.join(args.ckpt, f"step_{step}"), optimizer=opt, extra={"step": step})
        if first_attempt and dist.get_rank() == args.kill_rank and step == args.kill_after:
            os.kill(os.getpid(), signal.SIGKILL)
    full = pm.full_state_dict()
    if dist.get_rank() == 0:
        restarts = os.environ.get("TORCHELASTIC_RESTART_COUNT")
        torch.save({"step": step, "resumed_from": resumed_from, "restarts": restarts, "state": full}, args.out)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
