"""Emulate an AVX2-only x86 CPU for every Python process that has this folder on PYTHONPATH.

ONEDNN_MAX_CPU_ISA and ATEN_CPU_CAPABILITY cap what oneDNN and ATen dispatch on, but vLLM's
CPU build decides from ``torch.cpu.get_capabilities()`` (cpuinfo, which ignores both): which
of its kernel libraries to load (``_C`` for AVX512-BF16, ``_C_AVX512``, ``_C_AVX2``), its
attention ISA (AMX / AVX-512 / AVX2) and its AMX linear paths. With ``BATCHFLIP_ISA_CAP=avx2``
set, this file wraps that function, once ``torch.cpu`` is imported, so that every AVX-512,
AMX and AVX-VNNI feature reads False. Python imports ``sitecustomize`` at start-up in every
interpreter, so vLLM's engine-core processes are capped as well as the server's.

Used by ``bench/bench_default_run.py --emulate-avx2``; the stack fingerprint records the
variable (platform_facts.ISA_ENV_VARS) and the capped view (``torch_cpu_view``).
"""

from __future__ import annotations

import importlib.abc
import importlib.machinery
import os
import sys
from types import ModuleType
from typing import Any

# feature names of torch.cpu.get_capabilities() that an AVX2-only CPU lacks
_ABOVE_AVX2 = ("avx512", "amx_", "avx10", "avx_vnni", "avx_ne_convert")


def _cap(module: ModuleType) -> None:
    original = module.get_capabilities

    def get_capabilities() -> dict[str, Any]:
        caps = dict(original())
        for key in caps:
            if key.startswith(_ABOVE_AVX2):
                caps[key] = False
        return caps

    module.get_capabilities = get_capabilities


class _CapTorchCpu(importlib.abc.MetaPathFinder, importlib.abc.Loader):
    """Finds ``torch.cpu`` through the normal path, then caps it after it executes."""

    def find_spec(self, name: str, path: Any, target: Any = None) -> Any:
        if name != "torch.cpu":
            return None
        spec = importlib.machinery.PathFinder.find_spec(name, path)
        if spec is None or spec.loader is None:
            return None
        self._inner = spec.loader
        spec.loader = self
        return spec

    def create_module(self, spec: Any) -> Any:
        return self._inner.create_module(spec)

    def exec_module(self, module: ModuleType) -> None:
        self._inner.exec_module(module)
        _cap(module)


if os.environ.get("BATCHFLIP_ISA_CAP", "").lower() == "avx2":
    sys.meta_path.insert(0, _CapTorchCpu())
