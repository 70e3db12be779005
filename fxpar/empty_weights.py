"""Build a model whose parameters take no memory, to parallelize and then load.

``torch.device("meta")`` puts every tensor on the meta device, buffers included; but some buffers
are computed from the configuration in ``__init__`` and are in no checkpoint (rotary frequency
tables are non-persistent), so a meta-device model has no values for them. Under
``empty_weights()`` only parameters go to the meta device; buffers are made as usual (a few KiB).
"""

from __future__ import annotations

import contextlib

import torch.nn as nn


@contextlib.contextmanager
def empty_weights():
    """Parameters created inside go to the meta device; buffers stay where they are made.

    >>> import torch, fxpar
    >>> with fxpar.empty_weights():
    ...     layer = torch.nn.Linear(4096, 4096)
    >>> layer.weight.device.type
    'meta'

    The parameters are allocated one at a time, uninitialized (untouched pages take no memory),
    and moved to the meta device as they are registered; initialization then costs nothing.
    """
    register = nn.Module.register_parameter

    def register_on_meta(module, name, param):
        register(module, name, param)
        if param is not None and param.device.type != "meta":  # a tied weight is already there
            module._parameters[name] = nn.Parameter(param.to("meta"), requires_grad=param.requires_grad)

    nn.Module.register_parameter = register_on_meta
    try:
        yield
    finally:
        nn.Module.register_parameter = register
