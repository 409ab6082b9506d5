"""FD against network calls from `ddpm fd CKPT --nfe-table --json`: a PNG plot (log-log axes, one line per
sampler, the real-vs-real floor dashed), drawn with Pillow alone, and the Markdown table on stdout.

    ddpm fd runs/default/checkpoint.pt --nfe-table --json > nfe.json
    python benchmarks/plot_nfe.py nfe.json benchmarks/digits-fd-nfe.png
"""
import json
import math
import sys

from PIL import Image, ImageDraw

from ddpm_reference.ddpm import fd_table_markdown

COLOURS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75)]
W, H, LEFT, RIGHT, TOP, BOTTOM = 900, 560, 70, 300, 30, 50


def plot(result: dict, path: str) -> None:
    points = {name: [(c[1], c[0]) for c in cells] for name, cells in result["rows"].items()}
    xs = [p[0] for ps in points.values() for p in ps]
    ys = [p[1] for ps in points.values() for p in ps] + [result["floor"]]
    x0, x1 = math.log10(min(xs)), math.log10(max(xs))
    y0, y1 = math.log10(min(ys)) - 0.05, math.log10(max(ys)) + 0.05
    to_px = lambda x, y: (LEFT + (math.log10(x) - x0) / (x1 - x0) * (W - LEFT - RIGHT),  # noqa: E731
                          H - BOTTOM - (math.log10(y) - y0) / (y1 - y0) * (H - TOP - BOTTOM))
    image = Image.new("RGB", (W, H), "white")
    draw = ImageDraw.Draw(image)
    draw.rectangle([LEFT, TOP, W - RIGHT, H - BOTTOM], outline="black")
    for nfe in result["columns"]:
        px, _ = to_px(nfe, 10 ** y0)
        draw.line([px, H - BOTTOM, px, H - BOTTOM + 5], fill="black")
        draw.text((px - 10, H - BOTTOM + 8), str(nfe), fill="black")
    for e in range(math.floor(y0), math.ceil(y1) + 1):
        for m in (1, 2, 5):
            v = m * 10 ** e
            if y0 <= math.log10(v) <= y1:
                _, py = to_px(10 ** x0, v)
                draw.line([LEFT - 5, py, LEFT, py], fill="black")
                draw.text((LEFT - 45, py - 6), f"{v:g}", fill="black")
    draw.text((LEFT + (W - LEFT - RIGHT) / 2 - 80, H - 20), "network calls (NFE), log scale", fill="black")
    draw.text((5, TOP - 20), "digits FD (log scale)", fill="black")
    _, fy = to_px(10 ** x0, result["floor"])
    for x in range(LEFT, W - RIGHT, 12):
        draw.line([x, fy, x + 6, fy], fill="gray")
    draw.text((W - RIGHT + 10, fy - 6), "real-vs-real floor", fill="gray")
    for i, (name, ps) in enumerate(points.items()):
        colour = COLOURS[i % len(COLOURS)]
        pixels = [to_px(x, y) for x, y in ps]
        draw.line(pixels, fill=colour, width=2) if len(pixels) > 1 else None
        for px, py in pixels:
            draw.ellipse([px - 3, py - 3, px + 3, py + 3], fill=colour)
        draw.line([W - RIGHT + 10, TOP + 10 + 18 * i, W - RIGHT + 30, TOP + 10 + 18 * i], fill=colour, width=3)
        draw.text((W - RIGHT + 36, TOP + 4 + 18 * i), name, fill="black")
    image.save(path)


if __name__ == "__main__":
    if len(sys.argv) != 3:
        sys.exit("usage: python benchmarks/plot_nfe.py NFE.json OUT.png")
    with open(sys.argv[1]) as f:
        data = json.load(f)
    plot(data, sys.argv[2])
    print(fd_table_markdown(data["rows"], data["columns"], "NFE", data["floor"], data["n"]))
