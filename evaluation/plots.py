"""
The project's figures, drawn with pillow (matplotlib is not a dependency): line plots with
optional confidence bars (the paper's Fig. 5a, score vs w; Fig. 5b, loss vs step) and labelled
image grids (Fig. 4, methods x w; contact sheets of prompts x seeds). Every file is written
atomically.

    plots.line_plot({"teacher": (ws, scores), "student": (ws, scores2)}, "sweep.png",
                    title="adherence vs w", xlabel="w", ylabel="%", bars={"teacher": (lo, hi)})
    plots.image_grid([[pil, pil], [pil, pil]], "grid.png", row_labels=["cfg", "student"],
                     col_labels=["w = 2", "w = 8"])

Used by evaluate.py, generate.py and evaluation/toy_report.py.
"""

import math

from PIL import Image, ImageDraw, ImageFont

from sd3.checkpoint import atomic_write  # the project's one atomic-write mechanism

COLORS = [(31, 119, 180), (255, 127, 14), (44, 160, 44), (214, 39, 40), (148, 103, 189), (140, 86, 75),
          (227, 119, 194), (127, 127, 127)]


def _ticks(lo, hi, n=5):
    if hi == lo:
        return [lo]
    step = 10 ** math.floor(math.log10((hi - lo) / n))
    step *= next(m for m in (1, 2, 5, 10) if (hi - lo) / (step * m) <= n)
    return [k * step for k in range(math.ceil(lo / step), math.floor(hi / step) + 1)]


def _save(image, path):
    atomic_write(path, lambda tmp: image.save(tmp, format="PNG"), keep_same=True)  # a relaunch changes nothing
    return image


def line_plot(series, path, title="", xlabel="", ylabel="", size=(640, 420), bars=None):
    """series: {name: (xs, ys)} -> a PNG line plot with markers, axes, ticks and a legend.
    bars: {name: (los, his)}, a vertical bar per point (a confidence interval)."""
    bars = bars or {}
    W, H = size
    left, right, top, bottom = 70, 20, 30, 50
    font = ImageFont.load_default()
    xs = [x for s in series.values() for x in s[0]]
    ys = [y for s in series.values() for y in s[1] if math.isfinite(y)]
    ys += [v for lo_hi in bars.values() for side in lo_hi for v in side if math.isfinite(v)]
    if not xs or not ys:
        raise ValueError("line_plot: nothing to plot")
    x0, x1, y0, y1 = min(xs), max(xs), min(ys), max(ys)
    pad = (y1 - y0) * 0.05 or abs(y0) * 0.05 or 1.0
    y0, y1 = y0 - pad, y1 + pad
    x1 = x1 if x1 > x0 else x0 + 1

    def px(x, y):
        return (left + (x - x0) / (x1 - x0) * (W - left - right), top + (y1 - y) / (y1 - y0) * (H - top - bottom))

    img = Image.new("RGB", size, "white")
    d = ImageDraw.Draw(img)
    d.rectangle([left, top, W - right, H - bottom], outline="black")
    for tx in _ticks(x0, x1):
        p = px(tx, y0)
        d.line([p, (p[0], p[1] + 4)], fill="black")
        d.text((p[0] - 8, p[1] + 6), f"{tx:g}", fill="black", font=font)
    for ty in _ticks(y0, y1):
        p = px(x0, ty)
        d.line([(p[0] - 4, p[1]), p], fill="black")
        d.line([(p[0] + 1, p[1]), (W - right - 1, p[1])], fill=(230, 230, 230))
        d.text((4, p[1] - 6), f"{ty:.4g}", fill="black", font=font)
    for i, (name, (sx, sy)) in enumerate(series.items()):
        c = COLORS[i % len(COLORS)]
        if name in bars:
            for x, lo, hi in zip(sx, *bars[name]):
                if math.isfinite(lo) and math.isfinite(hi):
                    (bx, by0), (_, by1) = px(x, lo), px(x, hi)
                    d.line([(bx, by0), (bx, by1)], fill=c, width=1)
                    d.line([(bx - 3, by0), (bx + 3, by0)], fill=c)
                    d.line([(bx - 3, by1), (bx + 3, by1)], fill=c)
        pts = [px(x, y) for x, y in zip(sx, sy) if math.isfinite(y)]
        if len(pts) > 1:
            d.line(pts, fill=c, width=2)
        if len(pts) <= 60:
            for p in pts:
                d.ellipse([p[0] - 3, p[1] - 3, p[0] + 3, p[1] + 3], fill=c)
        d.rectangle([W - right - 150, top + 8 + 14 * i, W - right - 140, top + 18 + 14 * i], fill=c)
        d.text((W - right - 135, top + 6 + 14 * i), str(name), fill="black", font=font)
    d.text((left, 8), title, fill="black", font=font)
    d.text(((W + left) // 2 - 3 * len(xlabel), H - 18), xlabel, fill="black", font=font)
    d.text((4, top - 20), ylabel, fill="black", font=font)
    return _save(img, path)


def _fit(draw, text, font, width, lines=1):
    """text cut into at most `lines` lines of at most `width` pixels (the last one ending in ... if cut)."""
    words, out = str(text).split(), []
    while words and len(out) < lines:
        line = words.pop(0)
        while words and draw.textlength(line + " " + words[0], font=font) <= width:
            line += " " + words.pop(0)
        out.append(line)
    if words or (out and draw.textlength(out[-1], font=font) > width):
        last = out[-1] if out else ""
        while last and draw.textlength(last + "...", font=font) > width:
            last = last[:-1]
        out[-1:] = [last + "..."]
    return "\n".join(out)


def image_grid(rows, path, row_labels=(), col_labels=(), cell=256, resample=Image.BICUBIC, label_width=110):
    """rows: list of lists of PIL images (methods x w, Fig. 4; prompts x seeds) -> a labelled PNG grid.
    Each image is scaled to `cell` pixels wide, keeping the first image's aspect ratio (nearest-
    neighbour scaling keeps small pixel art sharp: resample=Image.NEAREST). Row labels are wrapped
    into the left margin, column labels cut to the cell width."""
    font = ImageFont.load_default()
    first = rows[0][0]
    cw, ch = cell, max(1, round(cell * first.height / first.width))
    lw = label_width if row_labels else 0
    th = 20 if col_labels else 0
    n_cols = max(len(r) for r in rows)
    gap = 2
    grid = Image.new("RGB", (lw + n_cols * (cw + gap), th + len(rows) * (ch + gap)), "white")
    d = ImageDraw.Draw(grid)
    for j, label in enumerate(col_labels):
        d.text((lw + j * (cw + gap) + 4, 4), _fit(d, label, font, cw - 8), fill="black", font=font)
    for i, row in enumerate(rows):
        if i < len(row_labels):
            d.multiline_text((4, th + i * (ch + gap) + 4), _fit(d, row_labels[i], font, lw - 8, max(1, ch // 14)),
                             fill="black", font=font)
        for j, im in enumerate(row):
            grid.paste(im.convert("RGB").resize((cw, ch), resample), (lw + j * (cw + gap), th + i * (ch + gap)))
    return _save(grid, path)
