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
    lines = render("GPU", 700.0, rows, floors).splitlines()
    ours = next(line for line in lines if "| ours |" in line)
    # floor 0.3 + 0.3 + 0.3 = 0.9 of 1.25 ms graphed
    assert ours.endswith("| 1.50x | 2.00x | 1.60x | 0.25x | 28% | 0.80 | 1.5 |")
    sonic = next(line for line in lines if "| SonicMoE |" in line)
    assert sonic.endswith("| 1.00 | 400.0 |")
    best = next(line for line in lines if "best of each" in line)
    assert best.endswith("| 0.30 | 0.30 | 0.30 | 0.90 |")
