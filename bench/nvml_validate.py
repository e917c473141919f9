"""Check NVML energy on a real NVIDIA GPU: the energy counter against integrated sampled power.

A PyTorch matmul load runs between two idle phases; one sampling thread reads, at each tick, both the
cumulative counter (nvmlDeviceGetTotalEnergyConsumption) and the power (nvmlDeviceGetPowerUsage), so
both energies cover exactly the same interval. Read-only: no clock or power limit is touched.
Exits with status 2 and a one-line reason where there is no usable GPU, counter or PyTorch.

Usage: python bench/nvml_validate.py [--gpu 0] [--seconds 20] [--hz 20] [--size 8192]
"""

from __future__ import annotations

import argparse
import sys
import time

from profilers.errors import PowerSourceError
from profilers.nvml import NVMLSource
from profilers.sampler import Sampler
from profilers.types import DeviceInfo, PowerReading, Provenance

NOT_APPLICABLE = 2


class CounterAndPower:
    """Two readings per tick of one GPU: ``counter`` (NVML energy) and ``power`` (to integrate)."""

    def __init__(self, source: NVMLSource, device: str) -> None:
        self.source, self.device = source, device

    def devices(self) -> list[DeviceInfo]:
        return [DeviceInfo("counter", self.device, "nvml"),
                DeviceInfo("power", self.device, "nvml", "integrated")]

    def read(self) -> list[PowerReading]:
        (r,) = [x for x in self.source.read() if x.device == self.device]
        return [
            PowerReading(r.t_s, "counter", r.energy_j, r.power_w, r.clock_mhz, Provenance.MEASURED),
            PowerReading(r.t_s, "power", 0.0, r.power_w, r.clock_mhz, Provenance.MEASURED),
        ]


def load(seconds: float, size: int) -> int:
    import torch

    a = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    b = torch.randn(size, size, device="cuda", dtype=torch.bfloat16)
    n, end = 0, time.monotonic() + seconds
    while time.monotonic() < end:
        for _ in range(8):
            a = (a @ b).clamp_(-1, 1)
        torch.cuda.synchronize()
        n += 8
    return n


def main(argv: list[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    ap.add_argument("--gpu", type=int, default=0)
    ap.add_argument("--seconds", type=float, default=20.0, help="matmul load duration")
    ap.add_argument("--idle", type=float, default=3.0, help="idle seconds before and after the load")
    ap.add_argument("--hz", type=float, default=20.0, help="sampling rate")
    ap.add_argument("--size", type=int, default=8192, help="matrix size")
    args = ap.parse_args(argv)
    try:
        source = NVMLSource(indices=[args.gpu], sample_hz=max(args.hz, 10.0))
    except PowerSourceError as e:
        print(f"nvml_validate: not applicable here: {e}")
        return NOT_APPLICABLE
    try:
        (info,) = source.devices()
        if info.energy_method != "counter":
            print(f"nvml_validate: {info.name} has no energy counter; nothing to compare")
            return NOT_APPLICABLE
        try:
            import torch
        except ImportError:
            print("nvml_validate: needs PyTorch with CUDA (pip install torch)")
            return NOT_APPLICABLE
        if not torch.cuda.is_available():
            print("nvml_validate: PyTorch sees no CUDA device")
            return NOT_APPLICABLE
        torch.cuda.set_device(args.gpu)
        sampler = Sampler(CounterAndPower(source, info.device), hz=args.hz, history=1_000_000,
                          integrate={"power"}).start()
        time.sleep(args.idle)
        steps = load(args.seconds, args.size)
        time.sleep(args.idle)
        sampler.stop()
        status = sampler.status()
        counter, power = sampler.history("counter"), sampler.history("power")
    finally:
        source.close()
    e_counter = counter[-1].energy_j - counter[0].energy_j
    e_power = power[-1].energy_j - power[0].energy_j
    span = counter[-1].t_s - counter[0].t_s
    rows = [
        ("GPU", f"{info.name} (gpu{args.gpu}), limit {info.power_limit_w} W"),
        ("window", f"{span:.1f} s: idle {args.idle:g} s, {steps} matmuls in {args.seconds:g} s, idle"),
        ("samples", f"{status.samples} at {args.hz:g} Hz, {status.errors_total} errors"),
        ("energy, counter", f"{e_counter:.1f} J (mean {e_counter / span:.1f} W)"),
        ("energy, integrated power", f"{e_power:.1f} J"),
        ("difference", f"{(e_power - e_counter) / e_counter:+.2%} (target within 3%)"),
    ]
    for k, v in rows:
        print(f"{k:<26} {v}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
