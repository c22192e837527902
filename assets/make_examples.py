"""Regenerates assets/example.png and assets/example.mp4 (run: python assets/make_examples.py)."""

from __future__ import annotations

import math
from pathlib import Path

from PIL import Image, ImageDraw

SIZE = (320, 240)
FPS = 24
SECONDS = 3
HERE = Path(__file__).resolve().parent


def draw_shapes() -> Image.Image:
    """A still life a model can describe: sky, grass, sun, house with red roof, tree."""
    im = Image.new("RGB", SIZE, (135, 196, 235))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 170, 320, 240), fill=(86, 160, 72))
    d.ellipse((248, 18, 298, 68), fill=(255, 214, 0))
    d.rectangle((60, 110, 150, 185), fill=(236, 226, 200), outline=(60, 50, 40), width=2)
    d.polygon([(50, 112), (105, 62), (160, 112)], fill=(200, 40, 40), outline=(60, 50, 40))
    d.rectangle((95, 145, 118, 185), fill=(110, 70, 40))
    d.rectangle((210, 130, 224, 190), fill=(110, 70, 40))
    d.ellipse((185, 80, 250, 145), fill=(40, 120, 50))
    return im


def ball_frame(t: float) -> Image.Image:
    """A red ball bouncing left to right over a floor, past a blue box."""
    im = Image.new("RGB", SIZE, (245, 245, 240))
    d = ImageDraw.Draw(im)
    d.rectangle((0, 200, 320, 240), fill=(120, 120, 120))
    d.rectangle((140, 150, 190, 200), fill=(40, 80, 200))
    x = 20 + (280 * t / SECONDS)
    y = 180 - 120 * abs(math.sin(math.pi * 2 * t / SECONDS))
    d.ellipse((x - 18, y - 18, x + 18, y + 18), fill=(220, 30, 30))
    return im


def write_video(path: Path) -> None:
    import av

    with av.open(str(path), mode="w") as out:
        stream = out.add_stream("libx264", rate=FPS)
        stream.width, stream.height = SIZE
        stream.pix_fmt = "yuv420p"
        stream.options = {"crf": "28", "preset": "veryslow"}
        for i in range(FPS * SECONDS):
            frame = av.VideoFrame.from_image(ball_frame(i / FPS))
            out.mux(stream.encode(frame))
        out.mux(stream.encode())


def main() -> None:
    draw_shapes().save(HERE / "example.png", optimize=True)
    write_video(HERE / "example.mp4")
    for name in ("example.png", "example.mp4"):
        print(name, (HERE / name).stat().st_size, "bytes")


if __name__ == "__main__":
    main()
