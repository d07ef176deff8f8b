"""agent.report and `svmotion report`: the PNG is a real image of sane size showing the curve."""

from __future__ import annotations

import json
import time
from pathlib import Path

import pytest
from click.testing import CliRunner
from PIL import Image

from agent.cli_report import report
from agent.report import load_record, phase_spans, rates

CURVE_RGB = (214, 39, 40)  # matplotlib's tab:red, the dirty-bytes curve


def converging_record(seconds: float = 12.0, step: float = 0.25) -> dict:
    """A record shaped like Migration.to_dict(): dirty bytes fall from 64 MiB to 0."""
    t0 = time.time() - seconds
    samples, n = [], int(seconds / step)
    for i in range(n + 1):
        t = i * step
        phase = "DiskCopy" if t < seconds * 0.6 else "CopyDirtyData" if t < seconds * 0.9 else "Complete"
        left = max(0.0, 1.0 - t / (seconds * 0.9))
        samples.append({"t": round(t, 3), "phase": phase, "dirty_bytes": int(64 * 2**20 * left),
                        "copied_bytes": int(70 * 2**20 * (1 - left)),
                        "guest_written_bytes": int(2**20 * t)})
    return {"id": "abc", "vm": "vm1", "state": "success", "error": None, "started": t0,
            "options": {"strategy": "optimized", "mirror": "sync"},
            "phases": [{"name": "DiskCopy", "started": t0, "seconds": seconds * 0.6}],
            "stuns": [{"kind": "mirror_install", "started": t0 + 0.1, "duration_seconds": 0.0008,
                       "max_wait_seconds": 0.0005},
                      {"kind": "switchover", "started": t0 + seconds * 0.9,
                       "duration_seconds": 0.004, "max_wait_seconds": 0.003}],
            "samples": samples}


def curve_columns(png: Path) -> dict[int, int]:
    """x -> topmost y of curve-coloured pixels, in the upper (convergence) plot."""
    image = Image.open(png).convert("RGB")
    width, height = image.size
    pixels = image.load()
    top: dict[int, int] = {}
    for x in range(width):
        for y in range(int(height * 0.6)):
            if all(abs(c - w) <= 30 for c, w in zip(pixels[x, y], CURVE_RGB)):
                top[x] = y
                break
    return top


def check_png(png: Path) -> None:
    """A valid PNG of sane size whose red curve falls from left to right."""
    assert png.read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"
    with Image.open(png) as image:
        image.verify()
    with Image.open(png) as image:
        assert image.format == "PNG"
        width, height = image.size
    assert 600 <= width <= 4000 and 400 <= height <= 4000, image.size
    columns = curve_columns(png)
    xs = sorted(columns)
    assert xs, "no dirty-bytes curve drawn"
    assert xs[-1] - xs[0] > width * 0.5, "the curve should span most of the time axis"
    # the convergence curve: it rises (the mirror is installed, everything is dirty), then
    # falls: its peak (smallest y) is well above where it ends, and well before the end
    peak = min(xs, key=lambda x: columns[x])
    assert columns[xs[-1]] - columns[peak] > height * 0.2, "the curve does not fall"
    assert xs[-1] - peak > width * 0.2, "the curve falls only at the very end"


def test_png_shows_the_convergence_curve(tmp_path):
    src = tmp_path / "vm1.json"
    src.write_text(json.dumps(converging_record()))
    out = tmp_path / "vm1.png"
    result = CliRunner().invoke(report, [str(src), "--png", str(out)])
    assert result.exit_code == 0, result.output
    assert "stun switchover" in result.output and "4.00 ms" in result.output
    check_png(out)


def test_png_check_rejects_a_flat_curve(tmp_path):
    # the image check can fail: a migration that never converges draws no falling curve
    record = converging_record()
    for sample in record["samples"]:
        sample["dirty_bytes"] = 32 * 2**20
    src, out = tmp_path / "flat.json", tmp_path / "flat.png"
    src.write_text(json.dumps(record))
    assert CliRunner().invoke(report, [str(src), "--png", str(out)]).exit_code == 0
    with pytest.raises(AssertionError):
        check_png(out)


def test_wrapped_migration_reply_is_accepted(tmp_path):
    src = tmp_path / "reply.json"
    src.write_text(json.dumps({"ok": True, "migration": converging_record()}))
    assert load_record(src)["vm"] == "vm1"


@pytest.mark.parametrize("content, message", [
    (None, "cannot read report"),
    ("not json", "is not JSON"),
    ('{"vm": "vm1"}', "has no 'samples' list"),
    ('{"samples": [{"t": 0}]}', "sample 0 lacks phase, dirty_bytes"),
    ('{"samples": [{"t": 0, "phase": "Null", "dirty_bytes": 0, "copied_bytes": 0, '
     '"guest_written_bytes": 0}]}', "needs at least 2"),
])
def test_bad_report_file_is_a_usage_error(tmp_path, content, message):
    src = tmp_path / "bad.json"
    if content is not None:
        src.write_text(content)
    result = CliRunner().invoke(report, [str(src), "--png", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert message in result.output and str(src) in result.output
    assert not (tmp_path / "x.png").exists()


def test_rates_and_phase_spans():
    samples = [{"t": 0, "phase": "DiskCopy", "copied_bytes": 0},
               {"t": 1, "phase": "DiskCopy", "copied_bytes": 100},
               {"t": 3, "phase": "CopyDirtyData", "copied_bytes": 300}]
    assert rates(samples, "copied_bytes") == ([0.5, 2.0], [100.0, 100.0])
    assert phase_spans(samples) == [("DiskCopy", 0.0, 3.0), ("CopyDirtyData", 3.0, 3.0)]
