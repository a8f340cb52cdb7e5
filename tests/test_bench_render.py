"""The benchmark's table (integration/bench_layer.py runs only on a GPU; its rendering runs anywhere)."""

from integration.bench_layer import render


def _row(variant, routing, total, graph, acc, peak, first=1.5):
    return dict(
        shape="seed",
        routing=routing,
        max_load=1.0,
        variant=variant,
        fwd_ms=1.0,
        total_ms=total,
        graph_ms=graph,
        acc_ms=acc,
        tflops=100.0,
        peak_gib=peak,
        peak_fresh_gib=0.7,
        saved_gib=0.1,
        first_call_s=first,
    )


def test_bench_table_ratios_non_gemm_share_and_sonic_column():
    rows = [
        _row("ours", "balanced", 2.0, 1.25, 2.5, 0.5),
        _row("grouped_mm baseline", "balanced", 3.0, 2.5, 4.0, 2.0),
        _row("SonicMoE", "balanced", 2.5, 2.0, 3.0, 1.0, first=400.0),
    ]
    floors = {
        "seed": {
            "torch._grouped_mm": dict(fwd=0.3, dx=0.4, dw=0.3),
            "triton TMA": dict(fwd=0.4, dx=0.3, dw=0.4),
        }
    }
    rows[0]["rel_errs"] = [0.004, 0.0061, 0.002, 0.003, 0.005]
    lines = render("GPU", 700.0, rows, floors).splitlines()
    ours = next(line for line in lines if "| ours |" in line)
    # floor 0.3 + 0.3 + 0.3 = 0.9 of 1.25 ms graphed; the largest error shown
    assert ours.endswith("| 1.50x | 2.00x | 1.60x | 0.25x | 28% | 0.0061 | 0.80 | 1.5 |")
    sonic = next(line for line in lines if "| SonicMoE |" in line)
    assert sonic.endswith("|  | 1.00 | 400.0 |")
    best = next(line for line in lines if "best of each" in line)
    assert best.endswith("| 0.30 | 0.30 | 0.30 | 0.90 |")


def test_emit_rewrites_only_its_block_of_a_shared_page(tmp_path, capsys):
    from integration.bench_layer import emit

    page = tmp_path / "benchmarks.md"
    emit("| new |\n", {"x": 1}, str(page), str(tmp_path / "p.json"), section="bench_e2e")  # a new page
    assert page.read_text() == "<!-- bench_e2e -->\n| new |\n<!-- /bench_e2e -->\n"
    page.write_text("# top\n<!-- bench_e2e -->\n| old |\n<!-- /bench_e2e -->\nprose after\n")
    emit("| newer |\n", {}, str(page), None, section="bench_e2e")
    assert page.read_text() == "# top\n<!-- bench_e2e -->\n| newer |\n<!-- /bench_e2e -->\nprose after\n"
    emit("| hf |\n", {}, str(page), None, section="bench_hf")  # no block yet: appended
    assert page.read_text().endswith("prose after\n\n<!-- bench_hf -->\n| hf |\n<!-- /bench_hf -->\n")
    emit("| all |\n", {}, str(page), None)  # no section: the whole file
    assert page.read_text() == "| all |\n"
    assert "| all |" in capsys.readouterr().out


def test_bench_layer_refuses_unknown_variants_and_shapes():
    import subprocess
    import sys
    from pathlib import Path

    script = Path(__file__).resolve().parents[1] / "integration" / "bench_layer.py"
    for flags, name in (
        (["--variants", "ours,bogus"], "--variants"),
        (["--shapes", "seed,huge"], "--shapes"),
    ):
        proc = subprocess.run([sys.executable, str(script), *flags], capture_output=True, text=True)
        assert proc.returncode == 2 and name in proc.stderr and "unknown" in proc.stderr, proc.stderr
