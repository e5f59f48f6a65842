"""The machine record that every benchmark JSON and every export carries."""

from __future__ import annotations

from pathlib import Path

from anomap.machine import cpu_flags, describe_machine, has_vnni, machine_line

EPYC = """processor\t: 0
model name\t: AMD EPYC 7B13
flags\t\t: fpu sse2 avx avx2 fma bmi2
"""
SAPPHIRE = """processor\t: 0
model name\t: Intel(R) Xeon(R) Platinum 8480+
flags\t\t: avx2 fma avx512f avx512bw avx512_vnni avx512_bf16 amx_tile amx_int8 amx_bf16
"""


def test_cpu_flags_and_vnni_are_read_from_cpuinfo(tmp_path: Path) -> None:
    for text, model, vnni in ((EPYC, "AMD EPYC 7B13", False),
                              (SAPPHIRE, "Intel(R) Xeon(R) Platinum 8480+", True)):
        (tmp_path / "cpuinfo").write_text(text)
        name, flags = cpu_flags(tmp_path / "cpuinfo")
        assert name == model and "avx2" in flags and has_vnni(flags) is vnni
    assert cpu_flags(tmp_path / "missing")[1] == set()


def test_the_record_names_cpu_cores_isa_libraries_and_load() -> None:
    record = describe_machine()
    assert record["usable_cores"] >= 1 and set(record["isa"]) >= {"avx2", "avx512_vnni"}
    assert record["libraries"]["torch"] and record["libraries"]["numpy"]
    assert len(record["load_average_1_5_15_min"]) == 3
    line = machine_line({"cpu": "AMD EPYC 7B13", "usable_cores": 2,
                         "isa": {"avx2": True, "avx512_vnni": False}})
    assert line == "AMD EPYC 7B13, 2 cores, AVX2"
