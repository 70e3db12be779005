"""Device profiles: what the cost model (``fxpar/cost.py``) knows of a device, as data.

Each profile gives peak dense FLOP/s per dtype, memory size and bandwidth, the bandwidth one
device has to its node's peers (NVLink) and to other nodes (its share of the network), the
latency of one step of a collective on each link, and the fractions of those peaks that large
kernels and collectives reach. The fractions are properties of the hardware and its libraries
(cuBLAS on large GEMMs, NCCL's bus bandwidth), measured once per device and never fitted to a
model. Sources are beside each number.

``"cpu"`` is this machine class as fxpar's tests run on it: one thread per process, gloo over
loopback TCP. ``measure_cpu()`` measures the same quantities afresh
(``benchmarks/estimate_vs_measured.py`` prints them).

>>> profile("h100-80gb").peak("bf16") / 1e12
989.0
"""

from __future__ import annotations

import time
from dataclasses import dataclass, field, replace

import torch

from .errors import OptionError

GB = 1e9


@dataclass(frozen=True)
class DeviceProfile:
    """One device. ``flops`` maps a dtype name to peak dense FLOP/s of matrix multiplication;
    ``memory`` is bytes of device memory, ``memory_bw`` bytes/s; ``intra_bw``/``inter_bw`` are
    bytes/s one device sends per direction to its node's peers and across nodes, ``intra_alpha``/
    ``inter_alpha`` seconds per step of a collective on each; ``matmul_eff``/``memory_eff``/
    ``link_eff`` the fractions of those peaks large kernels and collectives reach, ``attention_eff``
    the fraction of the matmul peak a fused attention kernel reaches; ``launch`` the least time any
    kernel takes (launch and dispatch); ``vector_rate`` elements (read and written) per second of
    ops without matmuls (norms, softmax, activations), where their arithmetic binds before memory
    does (CPUs); ``overlap`` whether communication runs beside computation (GPUs: NCCL on its own
    stream) or takes the same cores (gloo on a CPU);
    ``optimizer_passes`` how many parameter-sized tensors torch's AdamW reads and writes per step
    (its foreach implementation); ``sources`` where the numbers come from."""

    name: str
    flops: dict
    memory: float
    memory_bw: float
    intra_bw: float
    inter_bw: float
    intra_alpha: float
    inter_alpha: float
    matmul_eff: float
    memory_eff: float
    link_eff: float
    launch: float
    attention_eff: float = 0.6
    vector_rate: float = float("inf")
    optimizer_passes: int = 16
    overlap: bool = True
    sources: tuple = field(default=(), compare=False)

    def peak(self, dtype) -> float:
        """Peak dense FLOP/s of a matmul in ``dtype`` (a name or a ``torch.dtype``)."""
        key = _DTYPES.get(dtype, dtype)
        return self.flops.get(key, self.flops["fp32"])


_DTYPES = {torch.bfloat16: "bf16", torch.float16: "fp16", torch.float32: "fp32", torch.float64: "fp64"}

_NVIDIA = ("NVIDIA A100 datasheet (2021), H100 and H200 datasheets (2023-24), DGX B200 datasheet (2024): dense "
           "BF16 tensor FLOP/s (half the sparse figure), HBM size and bandwidth, NVLink per GPU (half per direction)",
           "DGX A100 / DGX H100 / DGX B200 reference architectures: one 200 Gb/s HDR (A100) or 400 Gb/s NDR "
           "(H100, H200, B200) InfiniBand adapter per GPU",
           "best achievable BF16 matmul (ml-engineering's MAMF table, torch + cuBLAS): A100 271 TFLOP/s (0.87), "
           "H100 795 (0.80, H200 alike), B200 1745 (0.78)",
           "NCCL ring all-reduce bus bandwidth about 0.8 of the link (nccl-tests: 365-370 GB/s on 8 H100 NVLink, "
           "235 GB/s on A100; NVIDIA/nccl#1455); small all-reduce about 6 us on NVLink (NVIDIA/nccl#1259), "
           "tens of us across nodes (NVIDIA/nccl#1244)",
           "fused attention: FlashAttention-2 reaches 50-73% of peak on A100 (Dao 2023), FlashAttention-3 and "
           "cuDNN attention 60-75% on H100 (Shah et al. 2024): 0.65 and 0.6 here")

PROFILES: dict[str, DeviceProfile] = {
    "a100-40gb": DeviceProfile("a100-40gb", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 40 * 2**30,
                               1555 * GB, 300 * GB, 25 * GB, 5e-6, 10e-6, 0.87, 0.85, 0.80, 4e-6, 0.65,
                               sources=_NVIDIA),
    "a100-80gb": DeviceProfile("a100-80gb", {"bf16": 312e12, "fp16": 312e12, "fp32": 19.5e12}, 80 * 2**30,
                               2039 * GB, 300 * GB, 25 * GB, 5e-6, 10e-6, 0.87, 0.85, 0.80, 4e-6, 0.65,
                               sources=_NVIDIA),
    "h100-80gb": DeviceProfile("h100-80gb", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 80 * 2**30,
                               3350 * GB, 450 * GB, 50 * GB, 5e-6, 10e-6, 0.80, 0.85, 0.80, 4e-6, 0.6,
                               sources=_NVIDIA),
    "h200-141gb": DeviceProfile("h200-141gb", {"bf16": 989e12, "fp16": 989e12, "fp32": 67e12}, 141 * GB,
                                4800 * GB, 450 * GB, 50 * GB, 5e-6, 10e-6, 0.80, 0.85, 0.80, 4e-6, 0.6,
                               sources=_NVIDIA),
    "b200-192gb": DeviceProfile("b200-192gb", {"bf16": 2250e12, "fp16": 2250e12, "fp32": 75e12}, 180 * GB,
                                8000 * GB, 900 * GB, 50 * GB, 5e-6, 10e-6, 0.78, 0.85, 0.80, 4e-6, 0.6,
                               sources=_NVIDIA),
    # measured here by measure_cpu() (2 cores, one thread per process, gloo over loopback); a CPU
    # reaches its own peaks, so the fractions are 1
    "cpu": DeviceProfile("cpu", {"bf16": 820e9, "fp16": 30e9, "fp32": 155e9}, 24 * 2**30, 28 * GB, 0.86 * GB,
                         0.86 * GB, 1.8e-3, 1.8e-3, 1.0, 1.0, 1.0, 3e-6, 0.5, 4.0e9, 15, overlap=False,
                         sources=("measure_cpu() on a 2-core x86 machine (AMX) with torch 2.13.0+cpu, 2026-12",
                                  "gloo over loopback between two processes, each all-reduce after a 4 ms matmul (as "
                                  "in a program): 16 KiB / 1 MiB / 16 MiB cost 3.7 / 4.9 / 23 ms, 1.8 ms per ring "
                                  "step and 0.86 GB/s (back to back, with nothing between them, 4 bytes take 0.2 ms: "
                                  "a rank that computed wakes gloo's threads)")),
}

# torch.cuda.get_device_name() -> profile
_CUDA_NAMES = (("a100", "80gb", "a100-80gb"), ("a100", "", "a100-40gb"), ("h100", "", "h100-80gb"),
               ("h200", "", "h200-141gb"), ("b200", "", "b200-192gb"))


def profile(device) -> DeviceProfile:
    """The profile named ``device`` (a name of ``PROFILES`` or a ``DeviceProfile``)."""
    if isinstance(device, DeviceProfile):
        return device
    key = str(device).lower()
    if key not in PROFILES:
        raise OptionError(f"device={device!r} is not one of {sorted(PROFILES)} (or give a fxpar.devices.DeviceProfile)")
    return PROFILES[key]


def current_device() -> str:
    """The profile of this process's device: the CUDA device's by its name, else ``"cpu"``."""
    if torch.cuda.is_available():
        name = torch.cuda.get_device_name().lower()
        mem = torch.cuda.get_device_properties(0).total_memory
        for chip, size, key in _CUDA_NAMES:
            if chip in name and (not size or mem > 60 * 2**30):
                return key
    return "cpu"


def measure_cpu(seconds: float = 0.3) -> DeviceProfile:
    """The ``"cpu"`` profile measured on this machine, one thread (as each process of a gloo run
    on two cores computes), on tensors the size of a small model's activations (a few MiB, out of
    the core's own cache as theirs are): matmul FLOP/s per dtype, copy bandwidth, the rate of norms,
    softmax and activations, fused attention's share of the matmul rate, AdamW's passes, the time
    of a tiny op (the eager dispatch floor). Links keep the table's gloo figures (measuring them
    needs two processes)."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        flops = {}
        for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16)):
            # a layer's three matmuls: forward, and the input's and the weight's gradients
            a = torch.randn(1024, 256, dtype=dtype, requires_grad=True)
            w = torch.randn(1024, 256, dtype=dtype, requires_grad=True)
            g = torch.randn(1024, 1024, dtype=dtype)
            flops[name] = 3 * 2 * 1024 * 256 * 1024 / _timed(lambda: torch.nn.functional.linear(a, w).backward(g),
                                                             seconds)
        x = torch.ones(2**21)  # 8 MiB
        y = torch.empty_like(x)
        bw = 2 * x.numel() * 4 / _timed(lambda: y.copy_(x), seconds)
        m = x.view(1024, 2048).requires_grad_()
        norm = torch.nn.LayerNorm(2048)
        mix = (torch.nn.functional.gelu, lambda t: torch.log_softmax(t, -1), norm, lambda t: t + t, lambda t: t * 2)
        moved = 3 * x.numel() * (2 + 2 + 2 + 3 + 2)  # forward, and a backward of twice its traffic
        rate = moved / sum(_timed(lambda: f(m).backward(y.view(1024, 2048)), seconds / len(mix)) for f in mix)
        q = torch.randn(8, 8, 128, 32)
        sdpa = 4 * q.numel() * 128 / _timed(lambda: torch.nn.functional.scaled_dot_product_attention(q, q, q), seconds)
        s = torch.ones(4, requires_grad=True)  # the floor of an op autograd records, as in training
        launch = _timed(lambda: s * 1.0001, seconds)
        params = [torch.nn.Parameter(torch.randn(256, 256)) for _ in range(32)]
        for p in params:
            p.grad = torch.randn_like(p)
        adamw = torch.optim.AdamW(params)
        passes = _timed(adamw.step, seconds) * bw / (4 * 256 * 256 * len(params))
    finally:
        torch.set_num_threads(threads)
    base = PROFILES["cpu"]
    return replace(base, flops={**base.flops, **flops}, memory_bw=bw, launch=launch, vector_rate=rate,
                   attention_eff=min(1.0, sdpa / flops["fp32"]), optimizer_passes=round(passes),
                   sources=("measure_cpu() on this machine",))


def _timed(fn, seconds: float) -> float:
    """Seconds per call of ``fn``, the best of a few runs of about ``seconds`` in all."""
    fn()
    best = float("inf")
    for _ in range(5):
        n, t0 = 0, time.perf_counter()
        while time.perf_counter() - t0 < seconds / 5:
            fn()
            n += 1
        best = min(best, (time.perf_counter() - t0) / n)
    return best

