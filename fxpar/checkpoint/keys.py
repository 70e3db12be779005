"""The keys of a checkpoint's flat state dict, and how a message names them.

``model.<name>`` for every parameter and persistent buffer (a tied weight under each of its
names), ``optim.state.<param>.<key>`` and ``optim.param_groups.<param>.<key>`` for the optimizer
(``checkpoint/optimizer.py``), ``rng.<rank>.<generator>`` for every rank's random-number states.
"""

from __future__ import annotations

MODEL = "model."
STATE = "optim.state."
GROUPS = "optim.param_groups."
RNG = "rng."


def stored(aliases, keys) -> str | None:
    """The key a tensor known by ``aliases`` is stored under in ``keys`` (its first name there)."""
    return next((f"{MODEL}{a}" for a in aliases if f"{MODEL}{a}" in keys), None)


def user_key(fqn: str) -> str:
    """'model.h.0.w' -> 'h.0.w'; 'optim.state.h.0.w.exp_avg' -> 'optimizer state h.0.w.exp_avg'."""
    if fqn.startswith(MODEL):
        return fqn[len(MODEL):]
    if fqn.startswith(STATE):
        return "optimizer state " + fqn[len(STATE):]
    return fqn
