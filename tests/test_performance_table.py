"""scripts/performance_table.py: each benchmark output becomes a column, each figure a row with
its value in its unit, a figure one run lacks stays empty, and the header names the machine."""

from __future__ import annotations

import json

import pytest


def _write(path, amp, figures):
    info = {"device": "cpu", "machine": "Test CPU 9000", "cpu_features": "avx2 avx512_bf16",
            "cpus": 2, "commit": "abc1234", "batch": "40x1x192x192", "amp": amp, "threads": 2}
    lines = ["figure   value  unit", "network_step  1.0  s"]  # table rows are skipped
    lines += [json.dumps({"name": n, "value": v, "unit": u, **info}) for n, v, u in figures]
    path.write_text("\n".join(lines) + "\n")
    return path


def test_columns_rows_units_and_header(tmp_path, load_script):
    table = load_script("performance_table")
    a = _write(tmp_path / "a.txt", "off", [("network_step", 2.5, "s"),
                                           ("overhead_ratio", 1.0123, "x"),
                                           ("peak_memory", 3.456, "GiB")])
    b = _write(tmp_path / "b.txt", "bf16", [("network_step", 1.25, "s"),
                                            ("overhead_ratio", 0.99, "x")])
    out = table.table([table.read_run(a), table.read_run(b)], goals=True)
    lines = out.splitlines()
    assert lines[0] == ("Machines: all columns: Test CPU 9000 (2 CPUs; features: avx2 "
                        "avx512_bf16), `40x1x192x192` batch, commit abc1234.")
    assert "| figure | cpu, amp off, 2 threads | cpu, amp bf16, 2 threads | goal |" in lines
    assert "| network_step | 2.500 s | 1.250 s |  |" in lines
    assert "| overhead_ratio | 1.012 | 0.990 | ≤ 1.10 |" in lines
    assert "| peak_memory | 3.46 GiB |  | < 4 GB |" in lines


def test_a_file_without_figures_is_an_error(tmp_path, load_script):
    table = load_script("performance_table")
    (tmp_path / "x.txt").write_text("nothing here\n")
    with pytest.raises(SystemExit, match="x.txt: no benchmark JSON lines"):
        table.read_run(tmp_path / "x.txt")


def test_gpu_columns_name_compile_and_take_the_gpu_goals(tmp_path, load_script):
    table = load_script("performance_table")
    a = tmp_path / "a.txt"
    info = {"device": "cuda", "machine": "Test GPU", "cpus": 16, "commit": "abc1234",
            "batch": "40x1x192x192", "threads": 16}
    a.write_text(json.dumps({"name": "overhead_ratio", "value": 1.5, "unit": "x", **info,
                             "amp": "bf16", "compile": "off"}) + "\n")
    b = tmp_path / "b.txt"
    b.write_text(json.dumps({"name": "protocol_estimate", "value": 11.73, "unit": "min", **info,
                             "amp": "bf16", "compile": "reduce-overhead"}) + "\n")
    c = tmp_path / "c.txt"
    c.write_text(json.dumps({"name": "joint_step", "value": 0.0142, "unit": "s", **info,
                             "amp": "bf16", "compile": "off", "cuda_graph": True}) + "\n")
    lines = table.table([table.read_run(a), table.read_run(b), table.read_run(c)],
                        goals=True).splitlines()
    assert ("| figure | cuda, amp bf16 | cuda, amp bf16, compile reduce-overhead "
            "| cuda, amp bf16, CUDA graph | goal |") in lines
    assert "| joint_step |  |  | 14.2 ms | ≤ 15 ms (bf16) |" in lines
    assert "| overhead_ratio | 1.500 |  |  | ≤ 1.25 |" in lines
    assert "| protocol_estimate |  | 11.7 min |  | < 15 min |" in lines


def test_short_times_in_milliseconds(load_script):
    table = load_script("performance_table")
    assert table.cell(0.0344, "s") == "34.4 ms"
    assert table.cell(0.1, "s") == "0.100 s"
    assert table.cell(3.9169, "s") == "3.917 s"
    assert table.cell(11.73, "min") == "11.7 min"


def test_cpu_and_gpu_columns_in_one_table(tmp_path, load_script):
    table = load_script("performance_table")
    cpu = _write(tmp_path / "cpu.txt", "off", [("overhead_ratio", 1.05, "x"),
                                               ("crf_scaling_w2", 0.85, "x")])
    gpu = tmp_path / "gpu.txt"
    info = {"device": "cuda", "machine": "Test GPU", "cpus": 16, "commit": "def5678",
            "batch": "40x1x192x192", "amp": "off"}
    gpu.write_text("\n".join(json.dumps({"name": n, "value": v, "unit": "x", **info})
                             for n, v in (("overhead_ratio", 1.5), ("crf_scaling_w2", 0.7))))
    lines = table.table([table.read_run(cpu), table.read_run(gpu)], goals=True).splitlines()
    assert lines[0] == ("Machines: column 1: Test CPU 9000 (2 CPUs; features: avx2 avx512_bf16)"
                        ", `40x1x192x192` batch, commit abc1234; column 2: Test GPU (16 CPUs; "
                        "features: none of note), `40x1x192x192` batch, commit def5678.")
    assert "| overhead_ratio | 1.050 | 1.500 | cpu ≤ 1.10; cuda ≤ 1.25 |" in lines
    assert "| crf_scaling_w2 | 0.850 | 0.700 | ≥ 0.8 |" in lines  # one goal on both
