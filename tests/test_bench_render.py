"""The benchmarks' tables and arguments (integration/bench_layer.py and quack_sweep.py run only on a
GPU; their rendering and argument checks run anywhere)."""

import importlib

import pytest

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


@pytest.mark.parametrize(
    "script, flags, name",
    [
        ("bench_layer", ["--variants", "ours,bogus"], "--variants"),
        ("bench_layer", ["--shapes", "seed,huge"], "--shapes"),
        ("quack_sweep", ["--shapes", "fine,huge"], "--shapes"),
        ("quack_sweep", ["--cfgs", "pp128x192c21,pp999"], "--cfgs"),
    ],
)
def test_bench_scripts_refuse_unknown_names(capsys, script, flags, name):
    main = importlib.import_module(f"integration.{script}").main
    with pytest.raises(SystemExit) as exit_:
        main(flags)
    err = capsys.readouterr().err
    assert exit_.value.code == 2 and name in err and "unknown" in err, err


def test_bench_numerics_column_helpers_on_cpu():
    """``rel_errors`` against ``fp32_reference`` (torch backend, CPU): 0 for the fp32 reference itself,
    bf16 rounding for a bf16 run, inf for a gradient a variant does not produce."""
    import torch

    from integration.bench_layer import fp32_reference, rel_errors, variants

    shape = (24, 16, 8, 4, 2)  # T, D, I, E, K
    T, D, I, E, K = shape
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: (torch.randn(*s, generator=g) * s[-1] ** -0.5).to(torch.bfloat16)  # noqa: E731
    inputs = [mk(T, D) * D**0.5, *(t.requires_grad_() for t in (mk(E, D), mk(E, 2 * I, D), mk(E, D, I)))]
    inputs.append(torch.zeros(E))
    grad_out = torch.randn(T, D, generator=g).to(torch.bfloat16)
    reference = fp32_reference(shape, inputs, grad_out)
    assert all(t.dtype == torch.float32 for t in reference) and len(reference) == 5
    ref_fn = variants(shape)["torch reference"]
    upcast = [t.detach().float().requires_grad_(t.requires_grad) for t in inputs]
    assert rel_errors(ref_fn, upcast, grad_out.float(), reference) == [0.0] * 5
    bf16 = rel_errors(ref_fn, inputs, grad_out, reference)
    assert all(0 < e < 0.05 for e in bf16), bf16
    no_gate = lambda x, gate, up, down, bias: ref_fn(x, gate.detach(), up, down, bias)  # noqa: E731
    assert rel_errors(no_gate, inputs, grad_out, reference)[2] == float("inf")


def test_quack_sweep_configuration_names():
    """``--cfgs`` names spell QuACK's GemmConfig fields: schedule, tile, cluster, then optionally the
    swizzle and the dynamic scheduler; a malformed name is None (refused by ``--cfgs``)."""
    from integration.quack_sweep import kinds_for, parse_cfg

    assert parse_cfg("pp128x192c21") == dict(
        tile_m=128, tile_n=192, pingpong=True, cluster_m=2, cluster_n=1, max_swizzle_size=8,
        is_dynamic_persistent=False,
    )  # fmt: skip
    got = parse_cfg("co256x128c12s4d")
    assert (got["pingpong"], got["cluster_n"], got["max_swizzle_size"], got["is_dynamic_persistent"]) == (
        False, 2, 4, True,
    )  # fmt: skip
    for bad in ("pp999", "co128x256c21s", "xx128x128c21", "pp128x128c31", "pp128x128c21dd"):
        assert parse_cfg(bad) is None, bad
    assert kinds_for("co256x128c12") == ["down", "dx"] and len(kinds_for("co256x128c21")) == 6
