"""Regenerate the small demo images in this folder (deterministic): python examples/make_examples.py"""

from pathlib import Path

import numpy as np
from PIL import Image, ImageDraw

HERE = Path(__file__).parent


def main() -> None:
    y, x = np.mgrid[0:192, 0:256]
    gradient = np.stack([x, y, 255 - x // 2], axis=-1).astype(np.uint8)
    Image.fromarray(gradient).save(HERE / "gradient.png", optimize=True)

    shapes = Image.new("RGB", (240, 180), (235, 230, 210))
    draw = ImageDraw.Draw(shapes)
    draw.ellipse((20, 30, 120, 130), fill=(200, 40, 40))
    draw.rectangle((130, 50, 220, 150), fill=(40, 90, 200))
    draw.polygon([(60, 170), (120, 140), (180, 170)], fill=(30, 160, 60))
    shapes.save(HERE / "shapes.jpg", quality=85)

    tiles = ((np.indices((160, 160)).sum(axis=0) // 20) % 2 * 255).astype(np.uint8)
    Image.fromarray(tiles, mode="L").save(HERE / "checkerboard-grayscale.png", optimize=True)

    sky = np.zeros((120, 200, 3), np.uint8)
    sky[:80] = (120, 170, 230)
    sky[80:] = (70, 130, 60)
    photo = Image.fromarray(sky)
    exif = photo.getexif()
    exif[0x0112] = 6  # EXIF orientation: rotate 90° clockwise when shown
    photo.save(HERE / "landscape-exif-rotated.jpg", quality=85, exif=exif)


if __name__ == "__main__":
    main()
