"""Host facts in stack fingerprints: hand-written /proc/cpuinfo texts as oracles, and the
stack id changing with the CPU (the same default run on a Xeon and an EPYC gave different hf
numbers under one stack id before)."""

from __future__ import annotations

import json

import pytest

from batchflip import platform_facts as pf
from batchflip.generate import stack_fingerprint

# Two processors each; only the first block is read. The Xeon has AVX-512 with VNNI but no
# BF16; the EPYC (Zen 4) has AVX512_BF16 too. "avx512vbmi" is spelled without the underscore
# by the kernel, "avx512_vbmi2" with it.
XEON = """processor\t: 0
vendor_id\t: GenuineIntel
cpu family\t: 6
model\t\t: 85
model name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz
cpu MHz\t\t: 2494.140
flags\t\t: fpu vme sse2 ssse3 fma cx16 sse4_1 sse4_2 popcnt aes avx f16c avx2 avx512f \
avx512dq avx512cd avx512bw avx512vl avx512_vnni

processor\t: 1
vendor_id\t: GenuineIntel
model name\t: Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz
cpu MHz\t\t: 2601.000
flags\t\t: fpu sse2
"""
EPYC = """processor\t: 0
vendor_id\t: AuthenticAMD
model name\t: AMD EPYC 9454 48-Core Processor
cpu MHz\t\t: 2750.000
flags\t\t: fpu sse2 fma sse4_1 sse4_2 avx f16c avx2 avx512f avx512dq avx512ifma avx512cd \
avx512bw avx512vl avx512_bf16 avx512vbmi avx512_vbmi2 avx512_vnni
"""
GRAVITON = """processor\t: 0
BogoMIPS\t: 2100.00
Features\t: fp asimd evtstrm aes pmull sha1 sha2 crc32 atomics fphp asimdhp cpuid asimdrdm \
asimddp sha512 sve asimdfhm i8mm bf16 svebf16 svei8mm
CPU implementer\t: 0x41
CPU part\t: 0xd40
"""


def test_parse_xeon():
    facts = pf.parse_cpuinfo(XEON, "x86_64")
    assert facts == {
        "cpu_model": "Intel(R) Xeon(R) Gold 6248 CPU @ 2.50GHz", "cpu_vendor": "GenuineIntel",
        "arch": "x86_64",
        "isa": ["sse4_1", "sse4_2", "avx", "avx2", "fma", "f16c", "avx512f", "avx512cd",
                "avx512bw", "avx512dq", "avx512vl", "avx512_vnni"]}


def test_parse_epyc_has_bf16_and_no_clock():
    facts = pf.parse_cpuinfo(EPYC, "x86_64")
    assert facts["cpu_model"] == "AMD EPYC 9454 48-Core Processor"
    assert {"avx512_bf16", "avx512vbmi", "avx512_vbmi2", "avx512ifma"} <= set(facts["isa"])
    assert "amx_bf16" not in facts["isa"] and "fpu" not in facts["isa"]
    assert "2750" not in json.dumps(facts)  # clock speed is run-specific, never recorded


def test_parse_aarch64_features_and_part():
    facts = pf.parse_cpuinfo(GRAVITON, "aarch64")
    assert facts["cpu_model"] == "implementer 0x41 part 0xd40"
    assert facts["isa"] == ["fp", "asimd", "fphp", "asimdhp", "asimddp", "asimdfhm",
                            "asimdrdm", "bf16", "i8mm", "sve", "svebf16", "svei8mm"]


class _Engine:
    """Test double whose fingerprint carries the host facts of a given cpuinfo text."""

    name = "fake"

    def __init__(self, cpuinfo: str) -> None:
        self.cpu = pf.parse_cpuinfo(cpuinfo, "x86_64")

    def fingerprint(self) -> dict:
        return {"engine": "hf", "device": self.cpu["cpu_model"], "host": {"cpu": self.cpu}}


def test_same_run_on_xeon_and_epyc_gets_different_stack_ids():
    extra = {"prompt_format": "chat", "max_new_tokens": 16, "seed": 42}
    xeon = stack_fingerprint(_Engine(XEON), "no-such-model", extra)
    epyc = stack_fingerprint(_Engine(EPYC), "no-such-model", extra)
    assert xeon["stack_id"] != epyc["stack_id"]
    # the ISA alone changes it too (same model name, AVX512_BF16 added)
    bf16 = _Engine(XEON)
    bf16.cpu = {**bf16.cpu, "isa": [*bf16.cpu["isa"], "avx512_bf16"]}
    assert stack_fingerprint(bf16, "no-such-model", extra)["stack_id"] != xeon["stack_id"]
    # and the same machine twice gives the same id (resume keeps it)
    assert stack_fingerprint(_Engine(XEON), "no-such-model", extra)["stack_id"] == \
        xeon["stack_id"]


def test_host_facts_of_this_machine_are_stable(monkeypatch):
    monkeypatch.delenv("ONEDNN_MAX_CPU_ISA", raising=False)
    first, second = pf.host_facts(gpu=False), pf.host_facts(gpu=False)
    assert first == second and first["cpu"]["cpu_model"]
    assert first["libraries"]["torch"]  # the test environment has torch
    monkeypatch.setenv("ONEDNN_MAX_CPU_ISA", "AVX2")
    assert pf.host_facts(gpu=False)["cpu"]["isa_env"] == {"ONEDNN_MAX_CPU_ISA": "AVX2"}


def test_cuda_facts_without_cuda(monkeypatch):
    import torch

    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert pf.cuda_facts() is None


def test_hf_fingerprint_names_this_cpu(model_dir):
    """On the real SmolLM2 directory, built by the model stage when absent (a failing build
    fails the test, never skips it)."""
    from pathlib import Path

    from batchflip.engines.hf import HFEngine

    model = model_dir

    engine = HFEngine(str(model), "float32", 4, 42, device="cpu")
    fp = engine.fingerprint()
    names = [ln.split(":", 1)[1].strip() for ln in Path("/proc/cpuinfo").read_text().splitlines()
             if ln.startswith("model name")]
    if names:
        assert fp["device"] == fp["host"]["cpu"]["cpu_model"] == names[0]
    assert fp["host"]["cpu"]["aten_cpu_capability"] == \
        __import__("torch").backends.cpu.get_cpu_capability()
    assert "gpu" not in fp["host"]  # a CPU run records no GPU facts
    engine.close()


# dtype: auto. Oracles: the CPUs' published ISA (Xeon Gold 6248, Cascade Lake: AVX-512 VNNI,
# no BF16; EPYC 9454, Zen 4: AVX512_BF16; Graviton3: ARM BF16) and NVIDIA's compute
# capabilities (bf16 tensor cores from Ampere, 8.0; Turing 7.5 has none).
@pytest.mark.parametrize(("cpuinfo", "machine", "env", "cc", "want"), [
    (EPYC, "x86_64", {}, None, "bfloat16"),
    (XEON, "x86_64", {}, None, "float32"),
    (GRAVITON, "aarch64", {}, None, "bfloat16"),
    # oneDNN capped below its bf16 ISA on a bf16 CPU: bf16 is emulated there too
    (EPYC, "x86_64", {"ONEDNN_MAX_CPU_ISA": "AVX512_CORE_VNNI"}, None, "float32"),
    (EPYC, "x86_64", {"DNNL_MAX_CPU_ISA": "avx512_core_bf16"}, None, "bfloat16"),
    # an emulated AVX2-only CPU (bench/isa_cap): no native bf16 whatever the flags say
    (EPYC, "x86_64", {"BATCHFLIP_ISA_CAP": "avx2"}, None, "float32"),
    (XEON, "x86_64", {}, "9.0", "bfloat16"),   # an H100 on a Cascade Lake host
    (EPYC, "x86_64", {}, "7.5", "float16"),    # a T4: no bf16 tensor cores
])
def test_dtype_auto_is_bf16_only_where_it_is_native(cpuinfo, machine, env, cc, want):
    cpu = pf.parse_cpuinfo(cpuinfo, machine)
    if env:
        cpu["isa_env"] = env
    assert pf.resolve_dtype("auto", cpu, cc) == want
    assert pf.resolve_dtype("float16", cpu, cc) == "float16"  # an explicit dtype stays


def test_vllm_launch_resolves_dtype_auto_from_the_servers_host():
    from batchflip.engines.vllm_launch import build_launch
    from batchflip.settings import GenerationSettings

    params = GenerationSettings.from_mapping({
        "engine": "vllm", "dtype": "auto", "max_new_tokens": 4, "seed": 1, "study": "t",
        "model": "m", "prompt_format": "raw", "server": {}})
    probe = {"vllm_version": "0", "device_type": "cpu", "device": "FakeCPU",
             "compute_capability": None, "attention_backend_env": False,
             "batch_invariant_env": True}
    for cpuinfo, want in ((XEON, "float32"), (EPYC, "bfloat16")):
        host = {"cpu": pf.parse_cpuinfo(cpuinfo, "x86_64")}
        argv, _, _ = build_launch(params, "/m", 1, {**probe, "host": host})
        assert argv[argv.index("--dtype") + 1] == want


def test_hf_engine_records_the_resolved_dtype_of_auto(model_dir, monkeypatch):
    from batchflip.engines import hf

    monkeypatch.setattr(hf, "cpu_facts", lambda: pf.parse_cpuinfo(XEON, "x86_64"))
    engine = hf.HFEngine(str(model_dir), "auto", 4, 42, device="cpu")
    fp = engine.fingerprint()
    assert fp["dtype"] == "float32" and fp["dtype_rule"] == "auto"
    assert next(engine.model.parameters()).dtype == __import__("torch").float32
    engine.close()
    explicit = hf.HFEngine(str(model_dir), "bfloat16", 4, 42, device="cpu").fingerprint()
    assert explicit["dtype"] == "bfloat16" and "dtype_rule" not in explicit


def test_isa_cap_hides_avx512_and_amx_from_what_vllm_reads():
    """bench/isa_cap/sitecustomize.py in a fresh interpreter: torch.cpu's feature queries,
    which vLLM's CPU build uses to pick its kernel library and attention ISA, report an
    AVX2-only CPU, and the fingerprint records the cap and that view."""
    import json
    import os
    import subprocess
    import sys

    from conftest import ROOT

    code = ("import json, torch; from batchflip.platform_facts import cpu_facts; "
            "print(json.dumps([torch.cpu._is_avx512_supported(), "
            "torch.cpu._is_avx512_bf16_supported(), torch.cpu._is_amx_tile_supported(), "
            "torch.cpu._is_avx2_supported(), cpu_facts()]))")
    env = {**os.environ, "BATCHFLIP_ISA_CAP": "avx2",
           "PYTHONPATH": f"{ROOT / 'bench/isa_cap'}:{ROOT / 'src'}"}
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    avx512, bf16, amx, avx2, facts = json.loads(out)
    assert (avx512, bf16, amx) == (False, False, False)
    assert avx2 == ("avx2" in pf.cpu_facts()["isa"])  # below the cap nothing is hidden
    assert facts["isa_env"] == {"BATCHFLIP_ISA_CAP": "avx2"}
    assert facts["torch_cpu_view"] == {"avx2": avx2, "avx512_f": False,
                                       "avx512_bf16": False, "amx_tile": False}
    assert not pf.native_bf16(facts)


def test_isa_cap_makes_vllm_cpu_load_its_avx2_kernels():
    """vLLM's CPU build picks its kernel library from torch.cpu's features: natively this
    AVX512-BF16 machine loads ``_C``, under the cap ``_C_AVX2`` (seen in /proc/self/maps)."""
    import os
    import re
    import subprocess
    import sys

    from conftest import ROOT

    pytest.importorskip("vllm.platforms.cpu", reason="vLLM's CPU build is not installed")
    code = ("import re; from vllm.platforms.cpu import CpuPlatform; "
            "CpuPlatform.import_kernels(); "
            r"print(sorted(set(re.findall(r'vllm/(_C\w*)\.abi3\.so', "
            "open('/proc/self/maps').read()))))")

    def loaded(cap: bool) -> str:
        env = {k: v for k, v in os.environ.items() if k != "BATCHFLIP_ISA_CAP"}
        if cap:
            env.update(BATCHFLIP_ISA_CAP="avx2",
                       PYTHONPATH=f"{ROOT / 'bench/isa_cap'}:{ROOT / 'src'}")
        out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                             text=True, check=True).stdout
        return re.findall(r"\[.*\]", out)[-1]

    assert loaded(True) == "['_C_AVX2']"
    if "avx512_bf16" in pf.cpu_facts()["isa"]:
        assert loaded(False) == "['_C']"
