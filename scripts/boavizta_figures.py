"""Regenerate the Boavizta figures in profilers/hardware/catalog.yaml, offline.

boaviztapi is not a dependency of the testbed (2.5.0 pins pandas<3, uvicorn<0.41 and fastapi<0.138, below what the
testbed runs), so install it apart, without its dependencies, next to the few it needs at import time:

    pip install --no-deps --target /tmp/boa boaviztapi==2.5.0
    pip install --no-deps --target /tmp/boadeps rapidfuzz toml scipy aiofile caio mangum markdown
    PYTHONPATH=/tmp/boa:/tmp/boadeps unshare -rn python scripts/boavizta_figures.py   # -rn: no network at all

It prints each figure the catalog ships: embedded GWP (kgCO2e, end of life excluded) of GPUs and host servers,
and the CPU power at 0% and 100% load from Boavizta's consumption profile.
"""

from __future__ import annotations

import warnings

warnings.filterwarnings("ignore")

from boaviztapi.compute.impacts_computation import compute_impacts  # noqa: E402
from boaviztapi.data.archetype import get_component_archetype, get_server_archetype  # noqa: E402
from boaviztapi.dto.component import CPU, GPU, RAM, Disk  # noqa: E402
from boaviztapi.dto.component.cpu import mapper_cpu  # noqa: E402
from boaviztapi.dto.component.gpu import mapper_gpu  # noqa: E402
from boaviztapi.dto.device.device import ConfigurationServer, Server, mapper_server  # noqa: E402


def embedded(model) -> float:  # type: ignore[no-untyped-def]
    imp = compute_impacts(model=model, duration=model.usage.hours_life_time.value, selected_criteria=["gwp"])
    return float(imp["gwp"]["embedded"]["value"])


def main() -> None:
    for name in ("NVIDIA H100 SXM 80GB", "NVIDIA A100 SXM4 80GB", "NVIDIA B200 180GB"):
        gpu = mapper_gpu(GPU(name=name), get_component_archetype("DEFAULT", "gpu"))
        print(f"GPU {name}: {embedded(gpu)} kg, life {gpu.usage.hours_life_time.value} h")
    for name in ("Intel Xeon Platinum 8480+", "AMD EPYC 7742"):
        cpu = mapper_cpu(CPU(name=name), get_component_archetype("DEFAULT", "cpu"))
        embedded(cpu)  # completes the consumption profile
        prof = cpu.usage.consumption_profile
        print(f"CPU {name}: TDP {cpu.tdp.value} W, {prof.apply_consumption_profile(0):.1f} W at 0%, "
              f"{prof.apply_consumption_profile(100):.1f} W at 100%")
    for label, cpu, dimms, ssds in (("hgx_h100", "Intel Xeon Platinum 8480+", 32, 10),
                                    ("dgx_a100", "AMD EPYC 7742", 16, 6)):
        server = Server(configuration=ConfigurationServer(
            cpu=CPU(units=2, name=cpu), ram=[RAM(units=dimms, capacity=64)],
            disk=[Disk(type="ssd", units=ssds, capacity=3840)]))
        model = mapper_server(server, archetype=get_server_archetype("platform_compute_high"))
        print(f"host {label}: {embedded(model)} kg, life {model.usage.hours_life_time.value} h")


if __name__ == "__main__":
    main()
