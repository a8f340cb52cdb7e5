"""GPU kernel time of profiled steps by category (MoE kernels, grouped GEMMs, attention, RoPE, dense
GEMMs, compiler-fused elementwise, optimizer) and by kernel, for ``full_integration.py --profile``.

``kernel_table(prof, steps)`` -> printable text; ``categorize(name)`` -> the category of one kernel;
``short_name(name, width)`` -> a kernel's name as the tables print it.
"""

from __future__ import annotations

from collections import defaultdict

from torch.autograd import DeviceType

_RULES = (  # (category, substrings of the kernel name); first match wins
    ("optimizer", ("adam", "multi_tensor")),
    ("attention (SDPA)", ("flash", "fmha", "attention", "cudnn")),
    ("MoE grouped GEMM (CUTLASS)", ("grouped", "groupproblem", "ptrarray")),
    ("ATen elementwise (eager)", ("at::native",)),
    ("rotary embedding (ours)", ("_rope_kernel",)),  # integration/rope.py
    ("MoE Triton kernels (ours)", ("_kernel",)),
    ("compiler-fused elementwise/reductions", ("triton_",)),
    ("dense GEMM (cuBLAS)", ("gemm", "nvjet", "xmma", "cutlass", "sm90")),
    ("copies and fills", ("copy", "fill", "memcpy", "memset", "cat")),
)


_NOISE = ("void ", "at::native::", "(anonymous namespace)::", "at::cuda::")


def short_name(name: str, width: int) -> str:
    """``name`` without the namespaces that fill ATen's kernel names (so that the functor, which says
    what a ``multi_tensor_apply_kernel`` does, fits), cut to ``width`` characters."""
    for noise in _NOISE:
        name = name.replace(noise, "")
    return name[:width]


def categorize(name: str) -> str:
    low = name.lower()
    for category, keys in _RULES:
        if any(k in low for k in keys):
            return category
    return "other"


def _busy_ms(intervals: list[tuple[float, float]]) -> tuple[float, float]:
    """(span, time covered by at least one interval) of ``(start, end)`` microsecond pairs, in ms."""
    if not intervals:
        return 0.0, 0.0
    intervals.sort()
    busy, (cur_start, cur_end) = 0.0, intervals[0]
    for start, end in intervals[1:]:
        if start > cur_end:
            busy, cur_start = busy + cur_end - cur_start, start
        cur_end = max(cur_end, end)
    return (cur_end - intervals[0][0]) / 1e3, (busy + cur_end - cur_start) / 1e3


def _gaps(kernels: list[tuple[float, float, str]], top: int) -> list[tuple[float, str, str]]:
    """The ``top`` longest idle stretches between ``(start, end, name)`` kernels (microseconds): ``(us,
    kernel before, kernel after)``, longest first; overlapping kernels count as one busy stretch."""
    kernels = sorted(kernels)
    gaps, last_end, last_name = [], None, ""
    for start, end, name in kernels:
        if last_end is not None and start > last_end:
            gaps.append((start - last_end, last_name, name))
        if last_end is None or end >= last_end:
            last_end, last_name = end, name
    return sorted(gaps, key=lambda g: -g[0])[:top]


def kernel_table(prof, steps: int, top: int = 40, gaps: int = 20) -> str:
    """Per-step milliseconds of GPU kernels, summed by category and by name (longest first), how much
    of the profiled span the GPU was busy (the rest: waiting for the host), and the longest idle
    stretches with the kernels around them (where the host falls behind)."""
    by_name: dict[str, float] = defaultdict(float)
    kernels = []
    for evt in prof.events():  # GPU-side user annotations (record_function ranges) are not kernels
        if evt.device_type == DeviceType.CUDA and not getattr(evt, "is_user_annotation", False):
            by_name[evt.name] += evt.self_device_time_total / 1e3 / steps
            kernels.append((evt.time_range.start, evt.time_range.end, evt.name))
    span, busy = _busy_ms([(start, end) for start, end, _ in kernels])
    by_cat: dict[str, float] = defaultdict(float)
    for name, ms in by_name.items():
        by_cat[categorize(name)] += ms
    total = max(sum(by_cat.values()), 1e-9)
    lines = [
        f"GPU kernel time per step: {total:.2f} ms; GPU busy {busy / steps:.2f} of {span / steps:.2f} ms "
        f"per step ({busy / max(span, 1e-9):.0%})",
        "| category | ms/step | share |",
        "| --- | --- | --- |",
    ]
    lines += [
        f"| {c} | {ms:.2f} | {ms / total:.0%} |" for c, ms in sorted(by_cat.items(), key=lambda kv: -kv[1])
    ]
    lines += ["", "| kernel | category | ms/step |", "| --- | --- | --- |"]
    for name, ms in sorted(by_name.items(), key=lambda kv: -kv[1])[:top]:
        lines.append(f"| {short_name(name, 110)} | {categorize(name)} | {ms:.3f} |")
    lines += ["", f"GPU idle, the {gaps} longest stretches of all steps (the host was behind):"]
    lines += ["| idle us | kernel before | kernel after |", "| --- | --- | --- |"]
    lines += [
        f"| {us:.0f} | {short_name(before, 80)} | {short_name(after, 80)} |"
        for us, before, after in _gaps(kernels, gaps)
    ]
    return "\n".join(lines)
